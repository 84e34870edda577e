"""Supervised fine-tuning on prompt -> completion pairs, with a parameter-efficient method.

  --config=configs/finetune_sft.py:lora   (none, lora, adapters, prefix; default lora)

Give the base and the data on the command line (--config.finetune.base=<gptjax workdir or local
Hugging Face GPT-2 folder>, --config.finetune.train_path=pairs.jsonl with {"prompt", "completion"}
records). The loss covers the completion only; examples are packed into sequences kept apart by
segment ids. LoRA follows Hu et al. 2021's GPT-2 setup (r 4-8, alpha 2r, lr 2e-4).
"""

from configs import base


def get_config(method: str = "lora"):
  c = base.get_config()
  c.name = f"finetune-sft-{method}"
  f = c.finetune
  f.task = "sft"
  f.peft = method
  f.template = "### Instruction:\n{prompt}\n\n### Response:\n"
  f.epochs = 3.0
  f.warmup_fraction = 0.03
  f.match_examples = 32  # greedy exact match on the first 32 validation prompts
  f.lora.update(rank=8, alpha=16.0, targets="attn/(qkv|out)")
  c.train.global_batch = 16
  c.train.eval_every = 200
  c.train.sample_tokens = 0
  c.checkpoint.save_every = 500
  c.optim.peak_lr = 2e-5 if method == "none" else 2e-4
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.0
  c.optim.weight_decay = 0.0 if method != "none" else 0.01
  c.lock()
  return c
