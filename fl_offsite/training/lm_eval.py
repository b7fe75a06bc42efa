"""lm-eval-harness integration: any fl-offsite model (full, emulated, plugged-in) as an lm-eval
``LM``, so users with hub access can score the paper's tasks (PIQA, ARC, HellaSwag, ...).

Registered as model type ``fl-offsite`` when lm-eval is installed (``pip install
'fl-offsite[lm-eval]'``); ``fl-offsite evaluate --lm-eval-tasks piqa,arc_easy`` uses it.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..models.generation import generate
from .evaluate import score_continuations


@register_model("fl-offsite")
class OffsiteLM(LM):
    """Log-likelihoods and greedy generation from a causal LM and its tokenizer."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config, "max_position_embeddings", 512)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _context_ids(self, context: str) -> list[int]:
        ids = self._ids(context)
        return ids or [self.tokenizer.bos_token_id or self.tokenizer.eos_token_id]

    def _score(self, pairs):
        return score_continuations(self.model, pairs, self.tokenizer.pad_token_id or 0,
                                   self.max_length, self.batch_size)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        return self._score([(self._context_ids(r.args[0]), self._ids(r.args[1]))
                            for r in requests])

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Whole-string log-likelihood in windows of ``max_length`` tokens."""
        results = []
        for r in requests:
            ids = self._ids(r.args[0])
            total, start = 0.0, 0
            while start < len(ids):
                window = ids[start:start + self.max_length - 1]
                context = ids[max(0, start - 1):start] or self._context_ids("")
                total += self._score([(context, window)])[0][0]
                start += len(window)
            results.append(total)
        return results

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        outputs = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or [self.tokenizer.eos_token]
            ids = torch.tensor([self._context_ids(context)[-(self.max_length - 1):]])
            budget = min(int(kwargs.get("max_gen_toks", 64)), self.max_length - ids.shape[1])
            generated = generate(self.model, ids, max_new_tokens=max(budget, 1),
                                 do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            text = self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None) -> dict:
    """Scores of ``tasks`` (lm-eval names; needs hub access for the task data)."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=OffsiteLM(model, tokenizer), tasks=tasks,
                                      limit=limit, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not k.endswith("_stderr,none")}
            for task, metrics in results["results"].items()}
