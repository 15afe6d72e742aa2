"""An lm-eval model backend that scores the continuations of a shared context from one pass over the context.

Multiple-choice tasks (HoC §2.3 zero-shot protocol) ask lm-eval for ``loglikelihood(context, continuation)`` once
per choice, and stock ``HFLM`` runs ``context + continuation`` through the model for every choice (its one-token
logits cache helps only where all choices are one token). ``SharedPrefixHFLM`` runs each context once, filling
the model's KV cache; the context's last logits score the first token of every continuation, and the rest of the
continuations run against the cached prefix, in batches across contexts. Everything
else is lm-eval's: tokenisation (``_encode_pair``), the loglikelihood protocol (per request, the summed log-prob
of the continuation tokens and whether every one is the greedy token), the caching hooks, rolling
log-likelihoods and generation.
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict

import torch
import torch.nn.functional as F
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm
from transformers import Cache

#: lm-eval's request triple: ((context, continuation) strings, or None for a rolling window; context ids;
#: continuation ids).
Request = tuple[tuple[str, str] | None, list[int], list[int]]

#: One context and all its continuations.
Group = tuple[list[int], list[list[int]]]


def cache_argument(model: torch.nn.Module) -> str:
    """The name of the KV cache in ``model``'s forward and output: transformers 5.x renamed ``past_key_values`` to
    ``cache`` (the old name warns, and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def expand_cache(cache: Cache, rows: torch.Tensor) -> Cache:
    """A copy of ``cache`` whose batch row ``r`` is ``cache``'s row ``rows[r]`` (each context's cached prefix once per
    continuation); ``cache`` itself is left as it is for the next batch of continuations. ``rows`` lives on the
    host, an index every device accepts (a model spread over GPUs included)."""
    out = copy.deepcopy(cache)
    out.batch_select_indices(rows)
    return out


@register_model("hf-shared-prefix")
class SharedPrefixHFLM(HFLM):
    """``HFLM`` whose ``_loglikelihood_tokens`` runs each shared context once and scores its continuations against
    the cached prefix. Same answers as ``HFLM`` to float round-off: only the forward passes are cut otherwise. Every
    forward holds at most ``batch_size`` sequences: up to that many contexts, then their continuations in batches
    of that many rows (each with a copy of its context's cached keys and values)."""

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """lm-eval's loglikelihood protocol: ``(sum of log p(continuation token), all tokens greedy)`` per request,
        in request order. Requests that share their context ids are scored by ``_score_groups``; the rest go to
        ``HFLM``'s own path: rolling windows (no request strings: ``loglikelihood_rolling`` stays lm-eval's), a
        context with a single continuation (nothing to share; HFLM batches those across contexts), a seq2seq
        model, and every request of a context where some continuation needs HFLM's left truncation to
        ``max_length`` (the truncated window no longer starts at the context)."""
        by_context: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, (strings, context, _) in enumerate(requests):
            if strings is not None:
                by_context[tuple(context)].append(i)
        shared = [idx for context, idx in by_context.items()
                  if self.backend == "causal" and len(idx) > 1
                  and all(len(context) + len(requests[i][2]) <= self.max_length + 1 for i in idx)]
        # longest contexts first, as HFLM's Collator orders requests: little padding, and any OOM comes at once
        shared.sort(key=lambda idx: -len(requests[idx[0]][1]))
        done = {i for idx in shared for i in idx}
        rest = [i for i in range(len(requests)) if i not in done]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        if rest:
            answers = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)
            for i, answer in zip(rest, answers, strict=True):
                results[i] = answer
        step = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else len(shared) or 1
        with tqdm(total=len(done), disable=disable_tqdm or self.rank != 0 or not done,
                  desc="Scoring continuations of shared contexts") as bar:
            for start in range(0, len(shared), step):
                passes = shared[start:start + step]
                scored = self._score_groups([(requests[idx[0]][1], [requests[i][2] for i in idx]) for idx in passes])
                for i, answer in zip([i for idx in passes for i in idx], scored, strict=True):
                    results[i] = answer
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                bar.update(len(scored))
        return results

    @torch.no_grad()
    def _score_groups(self, groups: list[Group]) -> list[tuple[float, bool]]:
        """Answers for ``groups``, in group then continuation order. The contexts run once, left-padded (masked;
        positions counted from each context's first token), fill the KV cache and give the last position's
        logits, which score every continuation's first token. The rest of a continuation, ``continuation[:-1]``,
        then runs against its context's cached prefix, so its logits at step j score its token j + 1: the
        logits of HFLM's ``(context + continuation)[:-1]`` window, to float round-off. These rows go longest first
        in batches of at most ``batch_size``, right-padded: under causal attention the padding comes after every
        scored position (its positions repeat the last real one)."""
        name = cache_argument(self.model)
        mixed = getattr(self, "mixed_precision_dtype", None)  # lm-eval >= 0.4.9 has it; None: the model's dtype
        autocast = torch.autocast(device_type=self.device.type, dtype=mixed, enabled=mixed is not None)
        contexts = [context for context, _ in groups]
        width = max(map(len, contexts))
        ids = torch.zeros(len(groups), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, context in enumerate(contexts):
            ids[b, width - len(context):] = torch.tensor(context)
            mask[b, width - len(context):] = 1
        with autocast:
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=(mask.cumsum(1) - 1).clamp(min=0).to(self.device),
                             use_cache=True, logits_to_keep=1)
        first = F.log_softmax(out.logits[:, -1], dim=-1, dtype=self.softmax_dtype).cpu()
        rows = [(b, cont) for b, (_, conts) in enumerate(groups) for cont in conts]
        logprob = [float(first[b, cont[0]]) for b, cont in rows]
        greedy = [int(first[b].argmax()) == cont[0] for b, cont in rows]

        tails = sorted((r for r, (_, cont) in enumerate(rows) if len(cont) > 1), key=lambda r: -len(rows[r][1]))
        step = self.batch_size if isinstance(self.batch_size, int) and self.batch_size > 0 else len(tails) or 1
        for start in range(0, len(tails), step):
            batch = tails[start:start + step]
            of = torch.tensor([rows[r][0] for r in batch])
            lengths = torch.tensor([len(rows[r][1]) - 1 for r in batch])
            span = int(lengths.max())
            tail_ids = torch.zeros(len(batch), span, dtype=torch.long)
            targets = torch.zeros_like(tail_ids)
            for i, r in enumerate(batch):
                cont = rows[r][1]
                tail_ids[i, :len(cont) - 1] = torch.tensor(cont[:-1])
                targets[i, :len(cont) - 1] = torch.tensor(cont[1:])
            steps = torch.minimum(torch.arange(span), lengths[:, None] - 1)
            positions = torch.tensor([len(c) for c in contexts])[of, None] + steps
            with autocast:
                logits = self.model(input_ids=tail_ids.to(self.device), position_ids=positions.to(self.device),
                                    attention_mask=torch.cat([mask[of], torch.ones_like(tail_ids)], 1).to(self.device),
                                    use_cache=True, **{name: expand_cache(out[name], of)}).logits
            logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
            targets = targets.to(logprobs.device)
            picked = logprobs.gather(2, targets.unsqueeze(-1)).squeeze(-1).cpu()
            hits = (logprobs.argmax(dim=-1) == targets).cpu()
            for i, (r, n) in enumerate(zip(batch, lengths.tolist(), strict=True)):
                logprob[r] += float(picked[i, :n].sum())
                greedy[r] = greedy[r] and bool(hits[i, :n].all())
        return list(zip(logprob, greedy, strict=True))
