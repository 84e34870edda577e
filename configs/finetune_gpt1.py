"""GPT-1's fine-tuning recipe (Radford et al. 2018, section 3.2 and 4.1) for a task with a head.

  --config=configs/finetune_gpt1.py:entail   (classify, entail, similarity, multiple_choice,
                                              token_classify; default classify)

Give the base and the data on the command line (--config.finetune.base=runs/x,
--config.finetune.train_path=..., val_path=...); the model's shape and tokenizer come from the
base. lr 6.25e-5, batch 32, 3 epochs, linear decay with warmup over 0.2% of training,
classifier dropout 0.1 and the auxiliary LM loss with weight 0.5.
"""

from configs import base

_TEXT_FIELDS = {"entail": "premise,hypothesis", "similarity": "premise,hypothesis",
                "multiple_choice": "context", "token_classify": "tokens"}


def get_config(task: str = "classify"):
  c = base.get_config()
  c.name = f"finetune-gpt1-{task}"
  f = c.finetune
  f.task = task
  f.text_fields = _TEXT_FIELDS.get(task, "text")
  f.epochs = 3.0
  f.warmup_fraction = 0.002
  f.head_dropout = 0.1
  f.aux_lm_weight = 0.5
  c.train.global_batch = 32
  c.train.eval_every = 0  # evaluate at the end
  c.train.sample_tokens = 0
  c.checkpoint.save_every = 0  # save at the end
  c.optim.peak_lr = 6.25e-5
  c.optim.schedule = "linear"
  c.optim.final_lr_fraction = 0.0
  c.optim.b2 = 0.999  # Adam's default (GPT-1 names no other)
  c.optim.weight_decay = 0.01  # GPT-1's w = 0.01 on non-bias, non-gain weights
  c.lock()
  return c
