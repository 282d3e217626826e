"""Give a tiny random base what every real base model has before anyone fine-tunes it: attention that can
find and copy text from the user's turn.

    python bench/tiny_pretrain.py MODEL_DIR --steps 2000      # in place; bench/tool_calls.py --pretrain_steps

A random tiny model's attention at the answer looks at fixed positions of a long system prompt, so a LoRA on
it cannot learn to carry a city from the question into a tool call (bench/results/tool_calls_cpu.json). This
trains all of the tiny model's weights on synthetic chats in its own template and tokens, none of them tool
calls: a system turn of a random chunk said twice (as long as a tool list), a user turn of random tokens, and
an answer that copies the user turn (whole, or a span of it once its first token is given). Loss only on the
copied tokens (the chunk's repeat and the answer). Prints the copy accuracy on fresh sequences; writes the weights back.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IGNORE = -100


def synthetic_chat(rng: random.Random, text_ids: list[int], role: dict[str, int], prefix: list[int],
                   newline: int, system_max: int = 360) -> tuple[list[int], list[int]]:
    """(ids, labels) of one chat whose answer copies (part of) the user turn."""
    # The system turn repeats a random chunk: every token of the repeat is a copy target too (dense signal for
    # the attention pattern that finds where the current text occurred before and reads what followed).
    chunk = [rng.choice(text_ids) for _ in range(rng.randint(system_max // 12, system_max // 2))]
    system = chunk + chunk
    user = [rng.choice(text_ids) for _ in range(rng.randint(3, 24))]
    if rng.random() < 0.5:  # the whole question, then the turn ends
        lead, given, copied = [], [], user + [role["user"]]
    else:  # a span of it after some answer text, its first token given (as "city='" says where a value starts)
        a = rng.randrange(len(user) - 1)
        lead = [rng.choice(text_ids) for _ in range(rng.randint(0, 6))]
        given, copied = [user[a]], user[a + 1:rng.randint(a + 2, len(user))]
    ids = prefix + [role["system"], newline] + system + [role["user"], newline] + user + [role["assistant"], newline]
    labels = [IGNORE] * len(ids)
    start = len(prefix) + 2 + len(chunk) + 1  # the repeat's second token on (its first is not predictable)
    labels[start:start + len(chunk) - 1] = chunk[1:]
    ids += lead + given + copied
    labels += [IGNORE] * (len(lead) + len(given)) + copied
    return ids[:-1], labels[1:]  # each position learns the next token


def pretrain_copy(folder: str, steps: int, batch: int = 16, lr: float = 2e-3, seed: int = 0,
                  system_max: int = 120, init_std: float | None = 0.02) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import common.models  # noqa: F401 - registers our tokenizers with AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if init_std:  # the tiny model's wide init (0.25, for LoRA on a random head) makes attention one-hot: restart
        torch.manual_seed(seed)
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=init_std)
    role = {r: tok.convert_tokens_to_ids(f"<|{r}|>") for r in ("system", "user", "assistant")}
    prefix = [tok.convert_tokens_to_ids(t) for t in ("[gMASK]", "sop")]
    special = set(tok.all_special_ids) | set(role.values()) | set(prefix)
    text_ids = [i for i in range(len(tok)) if i not in special]
    newline = tok.encode("\n", add_special_tokens=False)[0]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / steps))

    def batch_of(n: int):
        rows = [synthetic_chat(rng, text_ids, role, prefix, newline, system_max) for _ in range(n)]
        width = max(len(ids) for ids, _ in rows)
        x = torch.full((n, width), tok.pad_token_id)
        y = torch.full((n, width), IGNORE)
        for k, (ids, labels) in enumerate(rows):
            x[k, :len(ids)], y[k, :len(labels)] = torch.tensor(ids), torch.tensor(labels)
        return x, y

    model.train()
    t0 = time.time()
    for step in range(steps):
        x, y = batch_of(batch)
        logits = model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"copy pre-training step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    x, y = batch_of(64)
    with torch.no_grad():
        pred = model(input_ids=x, use_cache=False).logits.argmax(-1)
    mask = y != IGNORE
    accuracy = float((pred[mask] == y[mask]).float().mean())
    model.save_pretrained(folder)
    print(f"copy pre-training: {steps} steps in {time.time() - t0:.0f} s; copied-token accuracy on fresh "
          f"chats {accuracy:.1%}", flush=True)
    return {"steps": steps, "batch": batch, "lr": lr, "system_max": system_max, "init_std": init_std,
            "seconds": round(time.time() - t0),
            "copy_accuracy": round(accuracy, 4), "final_loss": round(loss.item(), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--system_max", type=int, default=120, help="longest system turn (random tokens)")
    args = ap.parse_args()
    pretrain_copy(args.model_dir, args.steps, args.batch, args.lr, system_max=args.system_max)


if __name__ == "__main__":
    main()
