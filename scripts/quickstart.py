"""Quickstart: build a tiny QwenMoE-GB, train a few steps with global-batch balance, save and reload it.

python scripts/quickstart.py [--out quickstart-model]
"""

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM

import modeling_qwenmoe_gb as qgb
from modeling_qwenmoe_gb.balance import GlobalBalancer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="where to save the model (default: a temporary folder)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = qgb.load_preset("tiny", aux_free=True, device_balance_groups=4)
    model = qgb.QwenMoeGBForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    balancer = GlobalBalancer(model)
    balancer.register_step_hook(optimizer)
    for step in range(args.steps):
        for _ in range(2):  # 2 gradient-accumulation micro-steps
            ids = torch.randint(0, config.vocab_size, (4, 64))
            out = model(input_ids=ids, labels=ids, add_balance_loss=False)
            balance, parts = balancer(out.router_stats)
            ((out.loss + balance) / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 4:
            m = balancer.pop_metrics()
            print(
                f"step {step + 1}: ce {out.loss.item():.3f}  global LBL {m['balance/global_lbl']:.3f}  "
                f"MaxVio {m['balance/maxvio_global']:.3f}  bias spread {m['balance/bias_spread']:.4f}"
            )

    out_dir = args.out or tempfile.mkdtemp(prefix="qwenmoe-gb-")
    model.save_pretrained(out_dir)
    again = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    model.eval()
    ids = torch.randint(0, config.vocab_size, (1, 16))
    same = torch.equal(model(ids).logits, again(ids).logits)
    print(f"saved to {out_dir}; reloaded with AutoModelForCausalLM: identical logits = {same}")


if __name__ == "__main__":
    main()
