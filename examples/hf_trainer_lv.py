"""Train a Hugging Face causal LM with lvopt's LV embedding-LR rule through ``transformers.Trainer``.

The model is built from a small config (nothing is downloaded) and trained on a synthetic
next-token task. The base LR is the one you would have tuned on a narrow proxy of width
``--base-width``; ``from_model`` scales it per role to the model's width (read from the
config) and prints the table of roles and learning rates.

The script passes ``rule="lv"`` explicitly (``--rule``, default ``lv``: the rule it shows);
the library's default rule is ``mup``, which ``--rule mup`` gives. ``lv`` is an opt-in: the
sweeps in experiments/lv_rule (REPORT.md) did not support its embedding exponent.

    python examples/hf_trainer_lv.py                        # Llama-style, LV rule, AdamW
    python examples/hf_trainer_lv.py --arch gpt2 --optimizer adamh --rule mup
"""

import argparse

import torch
import transformers
from transformers import Trainer, TrainingArguments

import lvopt


def build_model(arch: str, width: int, vocab: int, ctx: int):
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=vocab,
            max_position_embeddings=ctx,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(
        n_embd=width, n_layer=2, n_head=4, vocab_size=vocab, n_positions=ctx, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg)  # ties lm_head to wte: see the warning it prints


def synthetic_data(n: int, ctx: int, vocab: int, seed: int = 0):
    """Sequences that count upwards modulo a per-sequence period: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, vocab, (1,), generator=g))
        period = int(torch.randint(3, 9, (1,), generator=g))
        ids = (start + torch.arange(ctx) % period) % vocab
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--base-width", type=int, default=32, help="width at which --lr was tuned")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="base LR, tuned at --base-width")
    ap.add_argument("--rule", choices=sorted(lvopt.RULES), default="lv")
    ap.add_argument("--optimizer", choices=["adamw", "adamh"], default="adamw")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--output-dir", default="/tmp/lvopt_hf_trainer_lv")
    args = ap.parse_args()

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    model = build_model(args.arch, args.width, args.vocab, args.ctx)

    # The switch from torch.optim.AdamW: one call, per-role LRs scaled from base_width to width.
    opt_cls = lvopt.AdamH if args.optimizer == "adamh" else lvopt.AdamW
    opt = opt_cls.from_model(
        model,
        lr=args.lr,
        base_width=args.base_width,
        rule=args.rule,
        weight_decay=0.0 if args.optimizer == "adamh" else 0.01,
        verbose=True,
    )

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.steps // 10),
        logging_steps=max(1, args.steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    # optimizers=(opt, None): Trainer keeps lvopt's groups and builds its schedule on top; the
    # schedule multiplies every group's LR by the same factor (TrainingArguments.learning_rate
    # is not used).
    trainer = Trainer(
        model=model, args=training_args, train_dataset=synthetic_data(512, args.ctx, args.vocab), optimizers=(opt, None)
    )
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {result.global_step} steps")


if __name__ == "__main__":
    main()
