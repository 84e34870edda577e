"""The lm-evaluation-harness backend (gptjax/harness.py) on local lm-eval tasks: YAML over JSON
Lines written here, no download. Its log-likelihoods equal gptjax.evaluate's on the same examples, a
task's accuracy equals the project's own scorer, generation equals gptjax.generate cut at the stop
sequence, the CLI prints lm-eval's table, and the loop logs harness metrics."""

import copy
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from lm_eval.api.instance import Instance
import sentencepiece as spm

from gptjax import eval_tasks, evaluate, generate, harness, loop, metrics, serving
from gptjax.config import ConfigError
from gptjax.data.tokenizer import SentencePieceTokenizer
from test_evaluate import LAMBADA, MC, ONE, PPL, ROOT, run  # noqa: F401  (the shared run fixture)

MC_YAML = """task: gptjax_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {mc}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""

GEN_YAML = """task: gptjax_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {gen}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(run):  # noqa: F811
  folder = run["tmp"] / "harness_tasks"
  folder.mkdir(exist_ok=True)
  gen = run["tmp"] / "gen.jsonl"
  with open(gen, "w", encoding="utf-8") as f:
    for ex in eval_tasks.read_examples(MC, "mc"):
      f.write(json.dumps({"context": ex.context, "answer": ex.choices[ex.label]}) + "\n")
  (folder / "mc.yaml").write_text(MC_YAML.format(mc=MC))
  (folder / "gen.yaml").write_text(GEN_YAML.format(gen=gen))
  return str(folder)


@pytest.fixture(scope="module")
def lm(run):  # noqa: F811
  return harness.GptjaxLM(workdir=run["workdir"], batch_size=4)


def instance(kind, args, task="t"):
  return Instance(kind, {}, args, 0, (task, 0, 1))


def test_loglikelihoods_equal_gptjax_evaluate_on_the_same_examples(run, lm):  # noqa: F811
  """Every (context, choice) of the multiple-choice file and the LAMBADA targets: the harness's
  log-likelihood and greedy flag against `gptjax.evaluate.Scorer` on `example_requests`."""
  scorer = evaluate.Scorer(run["model"], run["tok"], batch_size=4)
  for path, kind in ((MC, "mc"), (LAMBADA, "lambada")):
    task = eval_tasks.Task(kind, kind, path, examples=tuple(eval_tasks.read_examples(path, kind)))
    want = scorer.score(run["params"], eval_tasks.example_requests(task, run["tok"], 128))
    requests = [instance("loglikelihood", (ex.context, choice))
                for ex in task.examples for choice in ex.choices]
    got = lm.loglikelihood(requests)
    np.testing.assert_allclose([g[0] for g in got], want["logprob"], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == list(want["greedy"])
    assert len(got) >= 10 and all(g[0] < 0 for g in got)


def test_rolling_loglikelihood_sums_the_documents_token_log_probs(run, lm):  # noqa: F811
  """A document's rolling log-likelihood is the sum of its windows' scores, and over a file they
  give gptjax.evaluate.perplexity's bits per byte."""
  docs = eval_tasks.read_documents(PPL)
  got = lm.loglikelihood_rolling([instance("loglikelihood_rolling", (d,)) for d in docs])
  scorer = evaluate.Scorer(run["model"], run["tok"], batch_size=4)
  ppl = evaluate.perplexity(scorer, run["params"], docs)
  nbytes = sum(len(d.encode("utf-8")) for d in docs)
  assert -sum(got) / (np.log(2) * nbytes) == pytest.approx(ppl["bits_per_byte"], rel=1e-5)


def test_a_tasks_accuracy_equals_the_projects_own_scorer(run, lm, tasks):  # noqa: F811
  manager = harness.task_manager(tasks)
  results = harness.evaluate_tasks(lm, ["gptjax_mc"], manager)
  scorer = evaluate.Scorer(run["model"], run["tok"], batch_size=4)
  task = eval_tasks.Task("mc", "mc", MC, examples=tuple(eval_tasks.read_examples(MC, "mc")))
  own = evaluate.multiple_choice(scorer, run["params"], task)
  assert results["gptjax_mc"]["acc"] == pytest.approx(own["acc"])


def test_generate_until_is_greedy_decoding_cut_at_the_stop(run, lm):  # noqa: F811
  prompts = ["Question: What do bees make?\nAnswer:", "The old lighthouse"]
  got = lm.generate_until([instance("generate_until", (p, {"until": ["e"], "max_gen_toks": 8}))
                           for p in prompts])
  served = serving.open_run(run["workdir"], devices=ONE)
  tok = run["tok"]
  new = generate.generate(served.model, served.params, [[tok.eos_id] + tok.encode(p)
                                                        for p in prompts], 8, temperature=0,
                          eos_id=tok.eos_id)
  for text, tokens in zip(got, new):
    full = tok.decode([t for t in tokens if t != tok.eos_id])
    assert text == full.split("e")[0]
    assert "e" not in text


@pytest.mark.slow  # 25 s (a fresh process imports lm-eval and jax); the slow CI step runs it
def test_the_cli_prints_lm_evals_table_for_a_local_task(run, tasks):  # noqa: F811
  proc = subprocess.run(
      [sys.executable, "scripts/harness.py", "run", "--model", "gptjax", "--model_args",
       f"workdir={run['workdir']}", "--batch_size", "4", "--tasks", "gptjax_mc,gptjax_gen",
       "--include_path", tasks],
      cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-3000:]
  print(proc.stdout)
  assert "|gptjax_mc " in proc.stdout and "|acc " in proc.stdout
  assert "|gptjax_gen" in proc.stdout and "exact_match" in proc.stdout


@pytest.mark.slow  # 15 s; the slow CI step runs it
def test_the_loop_logs_harness_metrics_at_each_eval(run, tasks):  # noqa: F811
  c = run["cfg"].copy_and_resolve_references()
  c.eval.update(tasks="", harness_tasks="gptjax_mc", harness_include=tasks, harness_limit=3)
  c.train.steps = 2
  workdir = str(run["tmp"] / "run_harness")
  loop.run(c, workdir, devices=ONE)
  rows = [r for r in metrics.read(workdir) if "eval/harness/gptjax_mc/acc" in r]
  assert [r["step"] for r in rows] == [2]
  assert 0.0 <= rows[0]["eval/harness/gptjax_mc/acc"] <= 1.0


def test_bad_harness_input_names_the_task_or_setting(run, lm, tasks, tmp_path):  # noqa: F811
  manager = harness.task_manager(tasks)
  with pytest.raises(ConfigError, match=r"config.eval.harness_tasks: unknown lm-eval task\(s\) "
                                        r"\['no_such_task'\]"):
    harness.check_tasks(["gptjax_mc", "no_such_task"], manager)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "broken.yaml").write_text("task: [unclosed\n")
  with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML"):
    harness.task_manager(str(bad))
  (bad / "broken.yaml").write_text("task: x\ndoc_to_text: y\n")
  with pytest.raises(ConfigError, match=r"broken.yaml is not a valid lm-eval task: it lacks "
                                        r"\['output_type'\]"):
    harness.task_manager(str(bad))
  # gptjax's own tokenizers round-trip any text (byte fallback, no normalisation); a SentencePiece
  # model brought in through data.tokenizer.path may not: NFKC and no byte fallback, like many.
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["the cat sat on the mat"] * 50),
                                 model_writer=proto, vocab_size=20, model_type="bpe",
                                 normalization_rule_name="nmt_nfkc", byte_fallback=False)
  other = copy.copy(lm)
  other.tokenizer = SentencePieceTokenizer(proto.getvalue())
  lm.check_stops(["\u2603", "\n"], "gen")  # the run's own tokenizer writes both
  with pytest.raises(ConfigError, match="task gen: generate_until's stop sequence '\u2603' cannot "
                                        "be encoded by this run's tokenizer"):
    other.generate_until([instance("generate_until", ("x", {"until": ["\u2603"]}), task="gen")])
  with pytest.raises(ConfigError, match=r"task gen: generation_kwargs \['num_beams'\] are not "
                                        "supported"):
    lm.generate_until([instance("generate_until", ("x", {"until": ["\n"], "num_beams": 4}),
                                task="gen")])
  with pytest.raises(ConfigError, match="--model_args: give workdir="):
    harness.GptjaxLM()


def test_a_hugging_face_folder_scores_as_torch_does(tmp_path):
  """`hf_dir=`: a random HF GPT-2 saved with a byte-level vocabulary; the harness's log-likelihoods
  against the same model's log-softmax in torch (context after EOS, as gptjax tokenizes)."""
  import torch
  from gptjax.data import gpt2_bpe
  from test_generate import hf_model
  model = hf_model()
  model.save_pretrained(tmp_path)
  vocab = {c: i for i, c in enumerate(gpt2_bpe.bytes_to_unicode().values())}
  tok = gpt2_bpe.GPT2BPETokenizer(vocab | {gpt2_bpe.EOS_TOKEN: 256}, [])
  tok.save(str(tmp_path))
  lm = harness.GptjaxLM(hf_dir=str(tmp_path), batch_size=2)
  pairs = [("Hi there", " friend"), ("x", "yz"), ("The cat sat on the", " mat.")]
  got = lm.loglikelihood([instance("loglikelihood", p) for p in pairs])
  for (context, continuation), (logprob, _) in zip(pairs, got):
    ctx, cont = [256] + tok.encode(context), tok.encode(continuation)
    with torch.no_grad():
      logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    want = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
    assert logprob == pytest.approx(want, rel=1e-4, abs=1e-4)
