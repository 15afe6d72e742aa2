"""Low-rank decomposition (SFSD, issue 7 §3), measured side by side in one process on SmolLM2-135M:

1. a whole perplexity-driven surgical search over the last 4 layers (28 modules, the small profile's
   bisect scan and search split) scoring each candidate from the cached inputs of its layer vs re-running
   the whole model per candidate (the reference's cost); the chosen ranks must be identical. The LM head
   and loss are ~36-40% of a forward here, which caps the gain;
2. a forward pass of the model decomposed at 50% of kappa in every unprotected layer (real factorised
   pairs) vs the dense model, same 8 x 256 windows (target: ratio dense / decomposed > 1).
Both decompositions come from one eigendecomposition per module (``decomposition.EIGH_CALLS`` is checked).
"""

import torch
from common_bench import interleaved, save

from common.core import arch, data, layer_inputs, models, profiles
from common.sfsd import budgets, decomposition, experiments, lowrank

KEY = "smollm2-135m"


def main() -> None:
    cfg = profiles.load_config("05_lowrank_decomposition", "small")
    model, tok = models.load_model(KEY)
    n_layers = len(arch.layers(model))
    protected = budgets.protected_layers(n_layers)
    layers = list(range(protected, n_layers))
    cal = data.token_windows(tok, KEY, cfg.corpus, cfg.calib_windows, cfg.calib_len, split="train")
    decomps = decomposition.decompose_model(model, cal, layers, cfg.batch_size,
                                      cache=experiments.decomposition_dir(KEY, model, cal, layers))
    test, search = experiments.heldout_windows(tok, KEY, cfg.corpus, cfg.eval_windows, cfg.eval_len,
                                                cfg.search_windows, cfg.search_len)
    inputs = layer_inputs.LayerInputs(model, search, batch_size=cfg.batch_size)
    calls = len(decomposition.EIGH_CALLS)
    tail = n_layers - 4  # the last 4 layers: the searched modules
    chosen = {}

    def search(cached: bool):
        def run():
            state = search.perplexity_search(model, decomps, inputs, "feature", cfg.tolerance, tail, cfg.scan,
                                              cached_prefix=cached)
            chosen[cached] = [s["rank"] for s in state.steps]
        return run

    t_search = interleaved({"cached_prefix": search(True), "full_forward": search(False)}, repeats=1, warmup=0)
    assert chosen[True] == chosen[False], "cached-prefix and full re-forward chose different ranks"
    dense_in = test.split(cfg.batch_size)

    def forward():
        with torch.no_grad():
            for ids in dense_in:
                model(input_ids=ids, use_cache=False)

    ranks = lowrank.uniform_ranks(decomps, 50, layers)
    pairs = {p: lowrank.factorised(model, decomps[p], "feature", r) for p, r in ranks.items()}
    dense = {p: model.get_submodule(p) for p in ranks}

    def swap(modules):
        for p, module in modules.items():
            model.set_submodule(p, module)

    def decomposed_forward():
        swap(pairs)
        try:
            forward()
        finally:
            swap(dense)

    with lowrank.decomposed(model, decomps, "feature", ranks):
        share = lowrank.model_share(model, decomps, ranks)
    t_forward = interleaved({"dense": forward, "decomposed_50": decomposed_forward}, repeats=3)
    assert len(decomposition.EIGH_CALLS) == calls, "a search recomputed an eigendecomposition"
    ratios = {"full_forward_over_cached_prefix_search": t_search["full_forward"] / t_search["cached_prefix"],
              "dense_over_decomposed50_forward": t_forward["dense"] / t_forward["decomposed_50"]}
    for name, r in ratios.items():
        print(f"{name:42s} {r:6.3f}x")
    print(f"search over the last 4 layers: {len(chosen[True])} modules, ranks {chosen[True]}; 50% model: "
          f"{share:.3f} of the parameters")
    print("->", save("lowrank", {"model": KEY, "seconds": {**t_search, **t_forward},
                                 "search_modules": len(chosen[True]), "decomposed_share": share, "ratios": ratios,
                                 "target": "search >= 1.5x, same ranks; decomposed forward faster (> 1)"}))


if __name__ == "__main__":
    main()
