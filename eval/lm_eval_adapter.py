"""lm-evaluation-harness adapter: our checkpoints as an lm-eval `LM`, registered as model type `braidlm`.

    pip install -e ".[eval]"      # lm-eval is in the eval extra; nothing here downloads a model
    python -m eval.lm_eval_adapter CKPT --tasks my_task --include-path my_tasks/ [--limit 100]
                                  # writes runs/eval/lm_eval/lm_eval.md; --out FILE.md to write elsewhere
    lm_eval --model braidlm --model_args pretrained=CKPT --tasks ... --include_path ...   (after importing this
        module, e.g. through `python -c "import eval.lm_eval_adapter, lm_eval.__main__ as m; m.cli_evaluate()"`)

`Scorer` holds the scoring itself and does not need lm-eval (it is what the CPU tests exercise directly):
  loglikelihood   (context, continuation) pairs -> (sum of log p(continuation tokens), whether greedy decoding
                  would produce exactly them). The pair is tokenized as lm-eval does: the whole string once,
                  the continuation being the tokens past the context's own encoding. An empty context is
                  conditioned on EOS (our document separator). Inputs longer than max_length keep their end.
  rolling         log-likelihood of a whole text from EOS, in windows of max_length predictions, each window
                  seeing up to max_length previous tokens.
  generate        greedy continuation, cut at the first `until` string.
Batches are left-padded; padding never touches any layer's state (see HybridLM.forward).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hybrid.errors import DataError, UserError, cli
from hybrid.generate import generate, left_pad
from hybrid.model import HybridLM

from .plots import add_out_argument, check_out, md_table, pick_device, require_positive, write_result

try:  # optional: the eval extra
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model as _register
    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False


class Scorer:
    def __init__(self, model: HybridLM, tokenizer, batch_size: int = 8, max_length: Optional[int] = None):
        self.model, self.tok, self.batch_size = model.eval(), tokenizer, batch_size
        self.max_length = max_length or model.layout.model.max_seq_len
        self.device = model.embed.weight.device

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces of the context belong to the continuation (as lm-eval does)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        cont = whole[len(ctx):]
        return [self.tok.eos_id] + ctx, cont

    @torch.no_grad()
    def _score(self, rows: Sequence[tuple[list[int], int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """rows: (tokens, n) = score the last n tokens of `tokens` given the ones before. Returns per row the
        log-probabilities of those n tokens and the greedy predictions at their positions."""
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i:i + self.batch_size]
            ids, mask = left_pad([t[:-1] for t, _ in chunk], pad_id=0, device=self.device)
            logp = F.log_softmax(self.model(ids, attention_mask=mask).float(), dim=-1)   # (batch, width, vocab)
            for j, (toks, n) in enumerate(chunk):
                target = torch.tensor(toks[-n:], device=self.device)
                lp = logp[j, -n:]
                out.append((lp.gather(-1, target[:, None])[:, 0], lp.argmax(-1) == target))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        rows = []
        for context, continuation in pairs:
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"loglikelihood: continuation {continuation!r} encodes to no tokens")
            toks = (ctx + cont)[-(self.max_length + 1):]
            rows.append((toks, min(len(cont), len(toks) - 1)))
        return [(float(lp.sum()), bool(greedy.all())) for lp, greedy in self._score(rows)]

    def rolling(self, texts: Sequence[str]) -> list[float]:
        results = []
        for text in texts:
            seq = [self.tok.eos_id] + self.tok.encode(text)      # predict seq[1:]
            rows, s, n, w = [], 1, len(seq) - 1, self.max_length
            while s <= n:
                e = min(s + w, n + 1)                             # targets seq[s:e]
                lo = max(0, e - 1 - w)                            # inputs seq[lo:e-1]
                rows.append((seq[lo:e], e - s))
                s = e
            results.append(float(sum(lp.sum() for lp, _ in self._score(rows))))
        return results

    def generate(self, contexts: Sequence[str], until: Sequence[str] = (), max_gen_toks: int = 64) -> list[str]:
        out = []
        for i in range(0, len(contexts), self.batch_size):
            prompts = [([self.tok.eos_id] + self.tok.encode(c))[-(self.max_length - max_gen_toks):] or [self.tok.eos_id]
                       for c in contexts[i:i + self.batch_size]]
            for toks in generate(self.model, prompts, max_new_tokens=max_gen_toks, stop_tokens=[self.tok.eos_id]):
                text = self.tok.decode([t for t in toks if t != self.tok.eos_id])
                cut = min([text.find(u) for u in until if u and u in text] or [len(text)])
                out.append(text[:cut])
        return out


if HAVE_LM_EVAL:
    @_register("braidlm")
    class BraidLM(_LMBase):
        """lm-eval model: `pretrained` is a train.py checkpoint directory."""

        def __init__(self, pretrained: str, device: Optional[str] = None, batch_size: int = 8,
                     max_length: Optional[int] = None, **_ignored):
            super().__init__()
            from .perplexity import load_checkpoint
            model, tok = load_checkpoint(pretrained, pick_device(device))
            self.scorer = Scorer(model, tok, int(batch_size), int(max_length) if max_length else None)

        @classmethod
        def from_model(cls, model: HybridLM, tokenizer, batch_size: int = 8, max_length: Optional[int] = None):
            """An instance around a model already in memory (tests, notebooks)."""
            self = cls.__new__(cls)
            _LMBase.__init__(self)
            self.scorer = Scorer(model, tokenizer, batch_size, max_length)
            return self

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self.scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self.scorer.rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for r in requests:
                context, kw = r.args
                until = kw.get("until", []) if isinstance(kw, dict) else []
                until = [until] if isinstance(until, str) else list(until)
                out += self.scorer.generate([context], until, int(kw.get("max_gen_toks", 64)))
            return out
else:
    BraidLM = None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m eval.lm_eval_adapter", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a checkpoint directory written by train.py")
    ap.add_argument("--tasks", nargs="+", required=True)
    ap.add_argument("--include-path", default=None, help="a folder of local task YAML files")
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default=None)
    add_out_argument(ap, "lm_eval", "lm_eval")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)
    require_positive(batch_size=args.batch_size, limit=args.limit)
    if args.include_path and not os.path.isdir(args.include_path):
        raise DataError(f"--include-path {args.include_path}: not a directory (expected a folder of lm-eval task "
                        "YAML files)")
    check_out(args.out)
    if not HAVE_LM_EVAL:
        raise UserError('lm-eval is not installed: pip install -e ".[eval]"')
    import lm_eval
    from lm_eval.tasks import TaskManager
    device = pick_device(args.device)
    lm = BraidLM(args.checkpoint, device=str(device), batch_size=args.batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, limit=args.limit,
                                  task_manager=TaskManager(include_path=args.include_path))
    rows = [(task, metric.split(",")[0], f"{value:.4f}") for task, metrics in res["results"].items()
            for metric, value in metrics.items() if isinstance(value, float) and "stderr" not in metric]
    body = f"Checkpoint: `{args.checkpoint}`\n\n" + md_table(["task", "metric", "value"], rows)
    print(write_result(args.out, "lm-eval", device, body, argv, "eval.lm_eval_adapter"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
