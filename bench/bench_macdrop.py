"""MacDrop's cost per training step (issue 5 §3: <= 5% over the same LoRA step). SmolLM2-135M with LoRA
r16 on all linear layers, one micro-batch of 8 wiki instruction pairs: forward + backward, against the same
plus what ``MacDropCallback`` adds per micro-batch (draw the k x d mask, mask up and gate, restore). Both
sides interleaved in one process."""

from common_bench import interleaved, save

from common.core import data, models, profiles
from common.hoc import detection, finetune
from common.hoc.macdrop import MacDrop

KEY = "smollm2-135m"


def main() -> None:
    model, tok = models.load_model(KEY)
    layer, channels = detection.massive_weights(model, [models.encode(tok, KEY, p) for p in profiles.DETECTION_PROMPTS])
    model = finetune.peft_model(model, finetune.ARMS["lora"], profiles.TrainSettings()).train()
    pairs = data.instruction_pairs("wiki", "train", 8, seed=0)
    batch = data.collate(data.tokenize_pairs(tok, KEY, pairs, 96), data.pad_id(tok))
    md = MacDrop(model, layer, channels)

    def lora_step():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    def macdrop_step():
        md.apply(md.mask(0.8, step=1))
        try:
            lora_step()
        finally:
            md.restore()

    def macdrop_work():  # what MacDrop adds, alone, 100 times
        for _ in range(100):
            md.apply(md.mask(0.8, step=1))
            md.restore()

    times = interleaved({"lora": lora_step, "lora_macdrop": macdrop_step, "macdrop_work_x100": macdrop_work},
                        repeats=9)
    ratios = {"macdrop_step_over_lora_step": times["lora_macdrop"] / times["lora"],
              "added_work_over_lora_step": times["macdrop_work_x100"] / 100 / times["lora"]}
    print(", ".join(f"{k} = {v:.4f}" for k, v in ratios.items()))
    print("->", save("macdrop_step", {"model": KEY, "tokens": list(batch["input_ids"].shape), "seconds": times,
                                      "ratios": ratios, "target": "<= 1.05 (added work <= 0.05)"}))


if __name__ == "__main__":
    main()
