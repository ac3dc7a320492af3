"""A Hugging Face Trainer whose compute_loss distills from a token-level logitcache cache.

    python examples/hf_trainer.py [WORKDIR]

A tiny GPT-2 teacher (random weights from a local GPT2Config; nothing is downloaded) is run once
over generated token sequences and its top-8 next-token distributions are cached with CacheWriter;
a smaller GPT-2 student is then trained for a few steps by a Trainer subclass that reads batches
from the cache (inputs joined by sample id) and returns kd_loss mixed with next-token CE.
Needs `transformers` and `accelerate`.
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import pipeline as lc

VOCAB, SEQ_LEN, SEQUENCES = 96, 16, 64


class KDTrainer(Trainer):
    """Trainer over a logitcache dataset: batches are dicts with `inputs` (B, L + 1) token ids and
    the cached targets for the B * L next-token rows."""

    def __init__(self, *args, kd_dataset: lc.CacheDataset, temperature: float, alpha: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_dataset, self.temperature, self.alpha = kd_dataset, temperature, alpha

    def get_train_dataloader(self):
        return self.kd_dataset.loader(num_workers=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tokens = inputs["inputs"]  # (B, L + 1)
        out = model(input_ids=tokens[:, :-1])  # logits (B, L, V)
        loss = lc.kd_loss(out.logits, inputs, temperature=self.temperature, alpha=self.alpha, labels=tokens[:, 1:])
        return (loss, out) if return_outputs else loss


def main(workdir: str) -> list[float]:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (SEQUENCES, SEQ_LEN + 1))  # sample id = row
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=None, eos_token_id=None)).eval()
    spec = {"teacher": {"name": "gpt2-tiny", "revision": "random-seed0"}, "dataset": {"fingerprint": "randint-64x17"}}
    with lc.CacheWriter(f"{workdir}/caches", spec=spec, encoding=lc.TopK(VOCAB, 8), num_classes=VOCAB,
                        seq_len=SEQ_LEN, rows_per_shard=16 * SEQ_LEN, chunk_rows=8 * SEQ_LEN) as w, torch.no_grad():
        for s in range(0, SEQUENCES, 16):
            w.add(np.arange(s, s + 16), logits=teacher(tokens[s:s + 16, :-1]).logits)  # (16, L, V)

    cache = lc.open_cache(w.path)
    student = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=None,
                                          eos_token_id=None))
    args = TrainingArguments(output_dir=f"{workdir}/trainer", max_steps=6, per_device_train_batch_size=8,
                             learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    trainer = KDTrainer(model=student, args=args, kd_dataset=cache.dataset(batch_size=8, inputs=tokens.numpy()),
                        temperature=cache.temperature, alpha=0.5)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"KDTrainer: {trainer.state.global_step} steps on cache {cache.id} ({cache.encoding.label()}), "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="hf_trainer-"))
