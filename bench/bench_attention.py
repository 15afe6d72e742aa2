"""Attention metrics (Inheritune §2, issue 6 §4), measured side by side in one process:

1. the batched metrics (one float64 ``eigvalsh`` of A A^T over every head) vs the per-head SVD loop (the
   reference implementation, as the authors' demo computes them) on the same stacked matrices: SmolLM2-135M's
   real attention probabilities, every layer and head of 8 wiki windows of T = 100 (2,160 matrices); the
   values are checked identical first; and vs the Inheritune demo's own rank loop (``reference.demo_energy_rank``:
   one float32 ``svdvals`` per matrix, k* only), checked to give the same k* on the same matrices;
2. the whole analysis pass (eager forward + hooks + metrics, ``capture_attention``) vs two plain backbone
   forwards of the same 32 windows (target: <= 1.0, i.e. no more than two forward passes);
   integer metrics (k*, m*, sink) must be identical, the float ones equal to 1e-9 relative (the entropy
   effective rank to 1e-6: sigma_i below ~1e-8 sigma_1 are not resolved through A A^T);
3. training throughput of the small-profile byte GPT (8 layers, d 128, 16 x 128 tokens a step), tokens/s.
"""

import time

import torch
from common_bench import interleaved, save
from reference import demo_energy_rank

from common.core import arch, data, models, profiles
from common.inheritune import attention, training

KEY = "smollm2-135m"


def main() -> None:
    model, tok = models.load_model(KEY)
    windows = data.token_windows(tok, KEY, "wiki", 32, 100)
    layers = list(range(len(arch.layers(model))))
    stack = torch.stack([torch.stack(list(attention.example_maps(model, windows[i:i + 1], layers).values()))
                         for i in range(8)])  # [8, L, H, T, T]: every layer and head of 8 windows
    batched, loop = attention.head_metrics(stack), attention.head_metrics_loop(stack)
    for name in attention.METRICS:  # erank: the Gram route resolves sigma only down to ~1e-8 sigma_1
        rtol = 1e-6 if name == "erank" else 1e-9
        same = torch.equal(batched[name], loop[name]) if not batched[name].is_floating_point() else \
            torch.allclose(batched[name], loop[name], rtol=rtol, atol=1e-12)
        assert same, f"batched and per-head loop disagree on {name}"
    assert torch.equal(demo_energy_rank(stack), batched["rank"]), "the Inheritune demo's k* differs from ours"
    t_metrics = interleaved({"batched": lambda: attention.head_metrics(stack),
                             "per_head_loop": lambda: attention.head_metrics_loop(stack),
                             "inheritune_demo_rank": lambda: demo_energy_rank(stack)}, repeats=3)
    body = arch.backbone(model)
    batches = windows.split(8)

    def two_forwards():
        with torch.no_grad():
            for _ in range(2):
                for ids in batches:
                    body(input_ids=ids, use_cache=False)

    t_pass = interleaved({"analysis": lambda: attention.capture_attention(model, batches),
                          "two_forwards": two_forwards}, repeats=3)
    cfg = profiles.load_config("04_attention_degeneration_inheritune", "small")
    gpt, _ = training.random_init(cfg.reference, 0)
    opt = training.make_optimizer(gpt, cfg.train)
    stream = data.token_stream("wiki", "train", "byte")
    steps = 20
    t = time.perf_counter()
    for step in range(steps):
        x, y = training.train_batch(stream, step, 0, cfg.train.batch_size, cfg.reference.block_size)
        gpt(x, labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tokens_per_s = steps * cfg.train.batch_size * cfg.reference.block_size / (time.perf_counter() - t)
    ratios = {"per_head_loop_over_batched": t_metrics["per_head_loop"] / t_metrics["batched"],
              "inheritune_demo_rank_over_batched": t_metrics["inheritune_demo_rank"] / t_metrics["batched"],
              "analysis_pass_over_two_forwards": t_pass["analysis"] / t_pass["two_forwards"]}
    for name, r in ratios.items():
        print(f"{name:36s} {r:6.3f}x")
    print(f"byte GPT training: {tokens_per_s:,.0f} tokens/s")
    print("->", save("attention_metrics", {"model": KEY, "matrices": list(stack.shape), "seconds": {**t_metrics, **t_pass},
                                          "gpt_tokens_per_s": tokens_per_s, "ratios": ratios,
                                          "reference": "Inheritune attention_demos.ipynb: svdvals per matrix, k* only (all five metrics batched)",
                                          "target": "loop/batched > 1; analysis <= 2 forwards (ratio <= 1)"}))


if __name__ == "__main__":
    main()
