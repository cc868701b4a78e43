"""Beam search (`num_beams > 1`, `do_sample=False`) with the semantics of transformers' `generate`.

Model-card snippets call `chat(..., dict(max_new_tokens=..., do_sample=False, num_beams=3))`; this returns what the
reference's `generate(num_beams=N, do_sample=False)` returns, token for token (tests/generation/test_beam_search.py
compares with transformers on the same weights):

* A beam's score is the sum of its tokens' log-softmax log-probabilities (after the repetition penalty over its
  generated tokens and the min_new_tokens eos mask, as in the greedy path).
* Each step ranks all N x V continuations and keeps the best K = max(2, 1 + number of eos ids) x N, so that N beams
  can still run on when the best ones all end in an eos id.
* A continuation *ends* when its token is an eos id or it reaches max_new_tokens. Ending continuations among the best
  N of the K become finished hypotheses scored `sum / length ** length_penalty` (length = generated tokens, eos
  included); the N finished hypotheses with the best scores are kept. The best N non-ending continuations run on.
* Stopping (`early_stopping`): False (the default) stops a row once the best running beam, scored at its current
  length, cannot beat the worst of N finished hypotheses; True stops once N hypotheses are finished; "never" with
  length_penalty > 0 scores the best running beam as if it reached max_new_tokens. Generation also stops when every
  continuation ends.
* The answer is each row's best finished hypothesis (num_return_sequences = 1), as in greedy: new tokens only, eos
  included, shorter rows padded with `pad_token_id` (the first eos id when none is given).

Cost: the prompt (and its images) is prefilled once per row, then its KV cache is copied to the N beams; after every
step the cache rows are gathered by the beam each surviving continuation came from (`KVCache.select`).
"""

from __future__ import annotations

import torch

from internvl.generation.inputs import pad_token_id, prepare_inputs
from internvl.generation.sampling import GenerationConfig, apply_repetition_penalty
from internvl.model.internvl import InternVLModel
from internvl.model.llm import KVCache

# transformers' "ruled out" score. It is *added*, never assigned, so real scores keep their exact float values; a
# ruled-out candidate can never outrank a real one (log-probabilities are far above -1e9).
RULED_OUT = -1.0e9


@torch.inference_mode()
def beam_search(
    model: InternVLModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    visual_features: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    streamer=None,
) -> torch.Tensor:
    """input_ids (B, L) left-padded -> the best hypothesis' new token ids (B, n <= max_new_tokens).

    Same signature and output as the reference `generate`, which calls this when `config.num_beams > 1`.
    """
    cfg = config or GenerationConfig(num_beams=2)
    if streamer is not None:
        raise ValueError(
            f"streaming is not available with beam search (num_beams={cfg.num_beams}): the answer is only known "
            "when the search ends; use num_beams=1 to stream"
        )
    if cfg.do_sample:  # GenerationConfig already refuses this; a hand-built config must not sample silently
        raise ValueError("beam sampling (do_sample=True with num_beams > 1) is not supported; use do_sample=False")
    device, input_ids, attention_mask, pixel_values = prepare_inputs(model, input_ids, attention_mask, pixel_values)
    b, nb, max_new = input_ids.shape[0], cfg.num_beams, cfg.max_new_tokens
    pad = pad_token_id(cfg)
    if max_new == 0:
        return torch.empty(b, 0, dtype=torch.long, device=device)
    eos = torch.tensor(cfg.eos_token_id or [-1], device=device)
    k = max(2, 1 + len(cfg.eos_token_id)) * nb  # candidates kept per row and step
    vocab = model.language_model.lm_head.out_features
    if k > nb * vocab:
        raise ValueError(f"num_beams={nb} needs a vocabulary of at least {k // nb} tokens, the model has {vocab}")

    # Prefill each row once, then give its N beams copies of the cache: row r's beams are flat rows r*N .. r*N+N-1.
    embeds = model.embed(input_ids, pixel_values=pixel_values, visual_features=visual_features)
    cache = KVCache(model.config.llm.num_layers)
    hidden = model.language_model(embeds, attention_mask=attention_mask, cache=cache)  # (B, L, D)
    to_beams = torch.arange(b, device=device).repeat_interleave(nb)  # (B*N,)
    cache.select(to_beams)
    mask = attention_mask[to_beams]  # (B*N, L)
    logits = model.language_model.lm_head(hidden[:, -1])[to_beams]  # (B*N, V)

    # Running beams. All N start as the same empty sequence, so only beam 0 may expand at the first step.
    run_tokens = torch.full((b, nb, max_new), pad, dtype=torch.long, device=device)
    run_scores = torch.zeros(b, nb, device=device)
    run_scores[:, 1:] = RULED_OUT
    # Finished hypotheses, best first: tokens, length, score, and whether the slot holds one yet.
    fin_tokens = run_tokens.clone()
    fin_len = torch.zeros(b, nb, dtype=torch.long, device=device)
    fin_scores = torch.full((b, nb), RULED_OUT, device=device)
    fin_real = torch.zeros(b, nb, dtype=torch.bool, device=device)
    may_improve = torch.ones(b, 1, dtype=torch.bool, device=device)  # can a running beam still beat the finished?
    in_top_n = torch.arange(k, device=device) < nb  # (K,): only the best N candidates may finish
    row_offset = torch.arange(b, device=device)[:, None] * nb

    for step in range(max_new):
        length = step + 1  # generated tokens of this step's candidates
        logp = torch.log_softmax(logits.float(), dim=-1)  # (B*N, V)
        logp = apply_repetition_penalty(logp, run_tokens[:, :, :step].reshape(b * nb, step), cfg.repetition_penalty)
        if step < cfg.min_new_tokens and cfg.eos_token_id:
            logp[:, list(cfg.eos_token_id)] = float("-inf")
        total = (logp.view(b, nb, vocab) + run_scores[:, :, None]).view(b, nb * vocab)
        top_scores, top_index = torch.topk(total, k)  # (B, K), best first
        parent, token = top_index // vocab, top_index % vocab  # beam within the row, token id
        cand = run_tokens.gather(1, parent[:, :, None].expand(b, k, max_new)).clone()  # (B, K, max_new)
        cand[:, :, step] = token
        ends = torch.isin(token, eos) | (length == max_new)  # (B, K)

        # Candidates that go on: the best N that did not end.
        go_scores = top_scores + ends.float() * RULED_OUT
        keep = torch.topk(go_scores, nb).indices  # (B, N)
        run_tokens = cand.gather(1, keep[:, :, None].expand(b, nb, max_new))
        run_scores = go_scores.gather(1, keep)
        run_parent = parent.gather(1, keep)

        # Candidates that finish: ending ones among the best N, while the row can still improve (and, with
        # early_stopping=True, while fewer than N hypotheses are finished).
        new_scores = top_scores / (length**cfg.length_penalty)
        row_full = fin_real.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
        new_scores = new_scores + row_full.float() * RULED_OUT
        new_scores = new_scores + (~may_improve).float() * RULED_OUT
        finishing = ends & in_top_n
        new_scores = new_scores + (~finishing).float() * RULED_OUT
        merged = torch.cat([fin_scores, new_scores], dim=1)  # (B, N+K): old hypotheses first
        best = torch.topk(merged, nb).indices  # (B, N)
        fin_scores = merged.gather(1, best)
        fin_real = torch.cat([fin_real, finishing], dim=1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(token, length)], dim=1).gather(1, best)
        fin_tokens = torch.cat([fin_tokens, cand], dim=1).gather(1, best[:, :, None].expand(b, nb, max_new))

        # Can the best running beam still beat the worst finished hypothesis? (transformers' heuristic)
        reach = max_new if (cfg.early_stopping == "never" and cfg.length_penalty > 0) else length
        best_running = run_scores[:, :1] / (reach**cfg.length_penalty)
        worst_finished = torch.where(fin_real, fin_scores.min(dim=1, keepdim=True).values, RULED_OUT)
        may_improve = may_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if (not bool(may_improve.any()) or bool(ends.all())
                or (cfg.early_stopping is True and bool(fin_real.all()))):
            break

        # Next step: every surviving beam continues from its parent's cache.
        cache.select((run_parent + row_offset).reshape(-1))
        mask = torch.cat([mask, torch.ones(b * nb, 1, dtype=mask.dtype, device=device)], dim=1)
        step_embeds = model.language_model.get_input_embeddings()(run_tokens[:, :, step].reshape(b * nb, 1))
        hidden = model.language_model(step_embeds, attention_mask=mask, cache=cache)
        logits = model.language_model.lm_head(hidden[:, -1])

    # The best finished hypothesis of each row (one always exists: the last step finishes the best N candidates).
    # Token buffers start as pad, so positions past a hypothesis' length are already pad.
    return fin_tokens[:, 0, : int(fin_len[:, 0].max())]
