"""Evaluation: scores equal a direct sum of token log-probs; multiple choice, LAMBADA, perplexity
and bits per byte against independent computations; few-shot prompts; the script; the loop hook;
bad input.

One short training run (with eval.tasks set) is shared by every test: its checkpoint, tokenizer and
model serve the scoring tests, and a copy of its parameters trained on the right answers of the
example task files serves the forced multiple-choice and LAMBADA cases.
"""

import functools
import json
import math
import os
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

import configs
from gptjax import config as config_lib, eval_tasks, evaluate, loop, metrics, run as run_lib, train
from gptjax.config import ConfigError
from test_loop import WORDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
MC, POOL, LAMBADA, PPL = (os.path.join(DATA, n) for n in
                          ("mc.jsonl", "mc_fewshot.jsonl", "lambada.jsonl", "ppl.txt"))
TASKS = f"qa:{MC}:mc:{POOL},lam:{LAMBADA}:lambada,txt:{PPL}:ppl"
ONE = jax.devices()[:1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """4 steps of a tiny model on random words plus the task texts, evaluating the tasks 1-shot."""
  tmp = tmp_path_factory.mktemp("eval")
  rng = random.Random(0)
  demos = [e.demo for path, kind in ((MC, "mc"), (LAMBADA, "lambada"))
           for e in eval_tasks.read_examples(path, kind)]
  with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
    for text in demos * 2 + [" ".join(rng.choices(WORDS, k=40)) for _ in range(100)]:
      f.write(json.dumps({"text": text}) + "\n")
  c = configs.load("tiny")
  c.data.update(source="files", paths=str(tmp / "docs.jsonl"), val_fraction=0.05,
                cache_dir=str(tmp / "cache"))
  c.data.tokenizer.vocab_size = 320
  c.model.update(n_layers=2, d_model=64, n_heads=2, ctx=128)
  c.train.update(global_batch=8, steps=4, log_every=2, eval_every=2, eval_batches=1,
                 sample_tokens=0, progress=False)
  c.optim.update(warmup_steps=1, peak_lr=3e-3)
  c.checkpoint.update(save_every=0, async_save=False)
  c.eval.update(tasks=TASKS, shots=1, seed=0)
  c.mesh.data = 1
  workdir = str(tmp / "run")
  loop.run(c, workdir, devices=ONE)
  restored = run_lib.restore(workdir, devices=ONE)
  return {"cfg": c, "workdir": workdir, "tmp": tmp, "restored": restored,
          "model": restored.trainer.model, "tok": restored.tokenizer,
          "params": jax.device_get(restored.params)}


@pytest.fixture(scope="module")
def scorer(run):
  return evaluate.Scorer(run["model"], run["tok"], batch_size=4)


@functools.partial(jax.jit, static_argnames="model")
def forward(params, inputs_BxL, model):
  return model.apply({"params": params}, inputs_BxL)


def direct_scores(model, params, requests, exact_shapes=False):
  """Per request: summed log-prob of the continuation, and whether argmax reproduces it, from a
  plain forward pass on the request alone, cut on the left to ctx + 1 tokens. Unless
  `exact_shapes`, it is right-padded to ctx (causal attention: padding cannot change what comes
  before it)."""
  ctx, out = model.args.ctx, []
  for context, continuation in requests:
    seq = np.array(list(context) + list(continuation))[-(ctx + 1):]
    inputs = seq[None, :-1]
    if not exact_shapes:
      inputs = np.pad(inputs, ((0, 0), (0, ctx - inputs.shape[1])))
    logits = np.asarray(forward(params, inputs, model)[0, :len(seq) - 1])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    n = len(continuation)
    targets = seq[1:][-n:]
    out.append((float(logp[-n:][np.arange(n), targets].sum()),
                bool((logits[-n:].argmax(-1) == targets).all())))
  return out


def test_scores_equal_a_direct_sum_of_token_log_probs(run, scorer, monkeypatch):
  tok, model, params = run["tok"], run["model"], run["params"]
  eos, ctx = tok.eos_id, model.args.ctx
  long_context = [eos] + tok.encode(" ".join(WORDS * 4))
  assert len(long_context) > ctx + 1  # this one is cut on the left
  requests = [([eos] + tok.encode("Question: What do bees make?\nAnswer:"), tok.encode(" honey")),
              (long_context, tok.encode(" the cat sat on the mat")),
              ([eos], tok.encode("the dog ran")),
              (long_context[:ctx], long_context[ctx:ctx + 5]),
              ([eos] + tok.encode("x"), long_context[1:ctx + 1]),  # the longest continuation
              ([eos] + tok.encode("the cat"), tok.encode(" sat"))]  # 6 rows: batches of 4 + 2
  got = scorer.score(params, requests)
  want = direct_scores(model, params, requests, exact_shapes=True)
  np.testing.assert_allclose(got["logprob"], [w[0] for w in want], rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(got["greedy"], [w[1] for w in want])
  np.testing.assert_array_equal(got["tokens"], [len(c) for _, c in requests])
  assert got["logprob"].max() < 0
  # Logits formed 16 positions at a time (a small budget): the same scores.
  monkeypatch.setattr(evaluate, "LOGITS_BUDGET", 4 * 16 * model.args.padded_vocab)
  sliced = evaluate.Scorer(model, tok, batch_size=4).score(params, requests)
  for k in got:
    np.testing.assert_allclose(sliced[k], got[k], rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="continuation"):
    scorer.score(params, [([eos], long_context[:ctx + 1])])  # a continuation longer than ctx


def dominated(params, tok_id):
  """The params with every position predicting token `tok_id` with near certainty: the final
  LayerNorm's scale zeroed (the output no longer depends on the input) and its bias set along
  the (enlarged) embedding of the token, which the tied output projection turns into logits."""
  p = jax.tree.map(np.array, params)
  p["wte"]["embedding"][tok_id] *= 10.0
  p["ln_f"]["scale"][:] = 0.0
  p["ln_f"]["bias"][:] = 20.0 * p["wte"]["embedding"][tok_id]
  return p


@pytest.fixture(scope="module")
def forced(run):
  """(params, word): the model made to continue anything with ` word` (one token)."""
  tok = run["tok"]
  word = next(w for w in WORDS if len(tok.encode(" " + w)) == 1)
  params = dominated(run["params"], tok.encode(" " + word)[0])
  [(logprob, greedy)] = direct_scores(run["model"], params,
                                      [([tok.eos_id, 5, 6], tok.encode(" " + word))])
  assert greedy and logprob > -1e-4
  return params, word


def write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def test_multiple_choice_forced_answers_score_100_and_shuffled_labels_do_not(run, scorer, forced):
  params, word = forced
  others = [w for w in dict.fromkeys(WORDS) if w != word]
  records = []
  # The right answer is ` word`, at i % 4.
  for i, e in enumerate(eval_tasks.read_examples(MC, "mc")):
    choices = [" " + w for w in others[i % 7:i % 7 + 3]]
    choices.insert(i % 4, " " + word)
    records.append({"context": e.context, "choices": choices, "label": i % 4})
  task = eval_tasks.load_tasks(f"f:{write_jsonl(run['tmp'] / 'forced.jsonl', records)}:mc")[0]
  got = evaluate.multiple_choice(scorer, params, task)
  assert got["examples"] == 30
  assert got["acc"] == got["acc_per_token"] == got["acc_per_byte"] == 1.0
  for r in records:
    r["label"] = (r["label"] + 1) % 4
  control = eval_tasks.load_tasks(f"c:{write_jsonl(run['tmp'] / 'shuffled.jsonl', records)}:mc")[0]
  assert evaluate.multiple_choice(scorer, params, control)["acc"] == 0.0
  # On the real file with the trained params: the argmax of each example's (normalised) scores.
  task = eval_tasks.load_tasks(f"qa:{MC}:mc")[0]
  requests = eval_tasks.example_requests(task, run["tok"], run["model"].args.ctx)
  scores = scorer.score(run["params"], requests)
  start, hits = 0, {"acc": [], "acc_per_token": [], "acc_per_byte": []}
  for e in task.examples:
    lp = scores["logprob"][start:start + len(e.choices)]
    ntok = np.array([len(c) for _, c in requests[start:start + len(e.choices)]])
    nbyte = np.array([len(c.encode()) for c in e.choices])
    for k, s in (("acc", lp), ("acc_per_token", lp / ntok), ("acc_per_byte", lp / nbyte)):
      hits[k].append(np.argmax(s) == e.label)
    start += len(e.choices)
  got = evaluate.multiple_choice(scorer, run["params"], task)
  for k, v in hits.items():
    assert got[k] == pytest.approx(np.mean(v)), k


def test_lambada_counts_greedy_last_words_and_target_perplexity(run, scorer, forced):
  task = eval_tasks.load_tasks(f"lam:{LAMBADA}:lambada")[0]
  ex = task.examples[0]
  assert ex.context.endswith("pointed at the") and ex.choices == (" table",)
  assert task.examples[-1].choices == (" shield",)  # the context/target form
  requests = eval_tasks.example_requests(task, run["tok"], run["model"].args.ctx)
  for params in (run["params"], forced[0]):
    want = direct_scores(run["model"], params, requests)
    got = evaluate.lambada(scorer, params, task)
    assert got["acc"] == pytest.approx(np.mean([g for _, g in want]))
    n_tokens = sum(len(c) for _, c in requests)
    assert got["target_ppl"] == pytest.approx(math.exp(-sum(s for s, _ in want) / n_tokens),
                                              rel=1e-4)
  assert got["acc"] == 0.0  # the forced model never says the real last words
  # ... and always says its own word: every example right, the target perplexity 1.
  params, word = forced
  mine = [{"context": e.context, "target": " " + word} for e in task.examples]
  mine = eval_tasks.load_tasks(f"m:{write_jsonl(run['tmp'] / 'mine.jsonl', mine)}:lambada")[0]
  got = evaluate.lambada(scorer, params, mine)
  assert got["acc"] == 1.0 and got["target_ppl"] == pytest.approx(1.0, abs=1e-4)


def test_fewshot_prompts_are_deterministic_and_exclude_the_example(run):
  own = eval_tasks.load_tasks(f"qa:{MC}:mc", shots=3)[0]
  pooled = eval_tasks.load_tasks(f"qa:{MC}:mc:{POOL}", shots=3)[0]
  n = len(own.examples)
  first = [eval_tasks.fewshot_prompt(own, i, 3, seed=1) for i in range(n)]
  assert first == [eval_tasks.fewshot_prompt(own, i, 3, seed=1) for i in range(n)]
  assert first != [eval_tasks.fewshot_prompt(own, i, 3, seed=2) for i in range(n)]
  demos = [e.demo for e in own.examples]
  for i, prompt in enumerate(first):
    parts = prompt.split(eval_tasks.SEPARATOR)
    assert len(parts) == 4 and parts[-1] == own.examples[i].context
    assert len(set(parts[:3])) == 3 and all(p in demos and p != demos[i] for p in parts[:3])
  pool_demos = {e.demo for e in pooled.pool}
  for i in range(n):
    parts = eval_tasks.fewshot_prompt(pooled, i, 3, seed=0).split(eval_tasks.SEPARATOR)
    assert set(parts[:3]) <= pool_demos and parts[-1] == pooled.examples[i].context
  assert eval_tasks.fewshot_prompt(own, 5, 0, seed=0) == own.examples[5].context
  with pytest.raises(eval_tasks.EvalError, match="5 few-shot examples .* fewer than the 6 shots"):
    eval_tasks.load_tasks(f"qa:{MC}:mc:{POOL}", shots=6)


def test_perplexity_and_bits_per_byte_match_eval_step_and_a_direct_count(run, scorer):
  tok, model, params = run["tok"], run["model"], run["params"]
  ctx = model.args.ctx
  docs = eval_tasks.read_documents(PPL) + ["Ünïcödé bytes: café ☕", " ".join(WORDS * 5)]
  got = evaluate.perplexity(scorer, params, docs)
  # Windows of ctx tokens over each document after an EOS, built here independently.
  windows = []
  for d in docs:
    ids = [tok.eos_id] + tok.encode(d)
    windows += [ids[s:s + ctx + 1] for s in range(0, len(ids) - 1, ctx)]
  assert len(windows) > len(docs)  # the long document spans several windows
  batch = {k: np.zeros((len(windows), ctx), t) for k, t in
           (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32))}
  for r, w in enumerate(windows):
    batch["inputs"][r, :len(w) - 1], batch["targets"][r, :len(w) - 1] = w[:-1], w[1:]
    batch["weights"][r, :len(w) - 1] = 1.0
  nats = -sum(s for s, _ in direct_scores(model, params, [(w[:1], w[1:]) for w in windows]))
  sc = train.StepConfig(seed=0, z_loss=0.0, dropout=False, vocab_parallel=False)
  out = jax.jit(functools.partial(train.eval_step, model=model, sc=sc))(params, batch)
  assert got["tokens"] == int(out["tokens"]) == sum(len(w) - 1 for w in windows)
  assert got["ppl"] == pytest.approx(math.exp(float(out["loss_sum"]) / float(out["tokens"])),
                                     rel=1e-5)
  n_bytes = sum(len(d.encode("utf-8")) for d in docs)
  assert got["bytes"] == n_bytes > sum(len(d) for d in docs)  # multi-byte characters counted
  assert got["bits_per_byte"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


def test_the_loop_logs_task_metrics_at_each_eval_and_they_reproduce(run, scorer):
  rows = [r for r in metrics.read(run["workdir"]) if "val_loss" in r]
  assert [r["step"] for r in rows] == [2, 4]
  names = ["eval/qa/acc", "eval/qa/acc_per_token", "eval/qa/acc_per_byte", "eval/lam/acc",
           "eval/lam/target_ppl", "eval/txt/ppl", "eval/txt/bits_per_byte"]
  for r in rows:
    assert all(0.0 <= r[k] <= 1.0 for k in names if "acc" in k)
    assert all(math.isfinite(r[k]) and r[k] > 0 for k in names if "acc" not in k)
  # The last row is the final parameters, i.e. the checkpoint restored here.
  tasks = eval_tasks.load_tasks(TASKS, shots=1)
  again = evaluate.flat_metrics(evaluate.run_tasks(scorer, run["params"], tasks, shots=1, seed=0))
  assert sorted(again) == sorted(names)
  for k in names:
    assert rows[-1][k] == pytest.approx(again[k], rel=1e-4), k


def test_script_evaluates_a_checkpoint_and_writes_json(run, scorer):
  workdir = run["workdir"]
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), f"--workdir={workdir}",
       f"--tasks=qa:{MC}:mc,lam:{LAMBADA}:lambada", "--shots=2", "--seed=3", "--val_docs=3"],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  path = os.path.join(workdir, "eval", "step_4.json")
  assert f"wrote {path}" in proc.stdout and "qa" in proc.stdout
  with open(path, encoding="utf-8") as f:
    report = json.load(f)
  assert (report["step"], report["shots"], report["seed"]) == (4, 2, 3)
  assert set(report["tasks"]) == {"qa", "lam", "val"}
  assert report["tasks"]["val"]["documents"] == 3 and report["tasks"]["val"]["bits_per_byte"] > 0
  # The script ran on all 8 devices, sharded; the numbers are those of one device here.
  tasks = eval_tasks.load_tasks(f"qa:{MC}:mc,lam:{LAMBADA}:lambada", shots=2)
  here = evaluate.run_tasks(scorer, run["params"], tasks, shots=2, seed=3)
  for name in ("qa", "lam"):
    for k in eval_tasks.METRICS[here[name]["kind"]]:
      assert report["tasks"][name][k] == pytest.approx(here[name][k], rel=1e-4), (name, k)


@pytest.mark.parametrize("record, message", [
    ({"choices": [" a", " b"], "label": 0}, r"bad\.jsonl:2: missing field 'context'"),
    ({"context": "Q", "choices": [" a", " b"], "label": 2},
     r":2: field 'label' is 2, out of range"),
    ({"context": "Q", "choices": [], "label": 0}, r":2: field 'choices' holds 0 choice"),
    ({"context": "Q", "choices": " a", "label": 0}, r":2: field 'choices' must be a list, got str"),
    ({"context": "Q", "choices": [" a", ""], "label": 0}, r":2: field 'choices' item 1"),
    ({"context": "Q", "choices": [" a", " b"], "label": "0"},
     r":2: field 'label' must be an integer"),
])
def test_bad_multiple_choice_lines_name_the_file_line_and_field(tmp_path, record, message):
  good = {"context": "Q", "choices": [" a", " b"], "label": 1}
  path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
  with pytest.raises(eval_tasks.EvalError, match=message):
    eval_tasks.load_tasks(f"t:{path}:mc")


def test_bad_specs_files_and_workdirs_raise_clear_errors(run, tmp_path):
  lam = write_jsonl(tmp_path / "lam.jsonl", [{"text": "oneword"}])
  with pytest.raises(eval_tasks.EvalError, match=r"lam\.jsonl:1: field 'text' needs at least two"):
    eval_tasks.load_tasks(f"l:{lam}:lambada")
  lam = write_jsonl(tmp_path / "lam2.jsonl", [{"context": "a b"}])
  with pytest.raises(eval_tasks.EvalError, match=r"lam2\.jsonl:1: missing field 'target'"):
    eval_tasks.load_tasks(f"l:{lam}:lambada")
  (tmp_path / "broken.jsonl").write_text('{"context": "x",\n', encoding="utf-8")
  with pytest.raises(eval_tasks.EvalError, match=r"broken\.jsonl:1: not valid JSON"):
    eval_tasks.load_tasks(f"b:{tmp_path / 'broken.jsonl'}:mc")
  with pytest.raises(eval_tasks.EvalError, match=r"--tasks: unknown task kind 'qa'"):
    eval_tasks.load_tasks(f"x:{MC}:qa", "--tasks")
  with pytest.raises(eval_tasks.EvalError, match=r"nope\.jsonl: no such file"):
    eval_tasks.load_tasks("x:nope.jsonl:mc")
  cfg = configs.load("tiny")
  cfg.eval.tasks = f"x:{MC}:multiple_choice"
  with pytest.raises(ConfigError, match=r"config\.eval\.tasks: unknown task kind"):
    config_lib.validate(cfg, n_devices=8)
  # The loop reads the task files before it trains or writes anything.
  bad = run["cfg"].copy_and_resolve_references()
  bad.eval.tasks = f"x:{tmp_path / 'missing.jsonl'}:mc"
  with pytest.raises(eval_tasks.EvalError, match="missing.jsonl: no such file"):
    loop.run(bad, str(tmp_path / "never"), devices=ONE)
  assert not os.path.exists(tmp_path / "never" / "config.json")
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(run["workdir"], "config.json")).read())
  with pytest.raises(ConfigError, match="holds no checkpoint"):
    run_lib.restore(str(empty), devices=ONE)
  with pytest.raises(ConfigError, match=r"no checkpoint at step 3; it has \[4\]"):
    run_lib.restore(run["workdir"], step=3, devices=ONE)
  with pytest.raises(ConfigError, match="no config.json"):
    run_lib.restore(str(tmp_path), devices=ONE)
