"""The token cache built by an Apache Beam pipeline (`pip install 'gptjax[beam]'`).

Beam is the engine TFDS uses for large datasets; the same pipeline runs on the DirectRunner (one
machine), Dataflow, Flink or Spark. It runs the independent-worker build of `cache.py`: task i of
N builds the units u with u mod N = i (each reads the corpus in order and tokenizes only its
units), and one final step checks every shard and commits the manifest. The entry is therefore
byte-identical to a local build's. Every Beam worker must see `data.cache_dir` and the corpus
files at the same paths (a shared filesystem).

    entry = beam_build.build(cfg.data, tokenizer, ["--runner=DirectRunner"])
"""

import json

import ml_collections

from gptjax.data import cache
from gptjax.data import workers
from gptjax.data import sources
from gptjax.data.errors import fail
from gptjax.data.tokenizer import Tokenizer


def build(d: ml_collections.ConfigDict, tokenizer: Tokenizer, beam_args: list[str],
          num_tasks: int = 0) -> cache.TokenCache:
  """Builds (or finds) the entry `cache.load_or_build(d, tokenizer)` would give, with Beam.

  Args:
    d: the `data` section of the config.
    tokenizer: the run's tokenizer (pickled to the Beam workers).
    beam_args: Beam pipeline options, e.g. ['--runner=DirectRunner', '--direct_num_workers=2'].
    num_tasks: parallel build tasks (0 = `data.build_workers`, else 8).

  Returns:
    The committed entry.

  Raises:
    DataError: Beam is not installed, or what `workers.build_worker` raises.
  """
  try:
    import apache_beam as beam  # pylint: disable=import-outside-toplevel
    from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise fail("data", "building with Beam needs Apache Beam, which is not installed",
               "pip install 'gptjax[beam]' (or build without --beam).") from e
  workers.check_shared(d)
  tasks = num_tasks or d.build_workers or 8
  settings = d.to_json()

  def run_task(index: int) -> int:
    task_d = ml_collections.ConfigDict(json.loads(settings))
    workers.build_worker(task_d, tokenizer, tasks, index, commit=False)
    return index

  def commit(finished: list[int]) -> str:
    if sorted(finished) != list(range(tasks)):
      raise RuntimeError(f"Beam finished tasks {sorted(finished)} of {tasks}")
    task_d = ml_collections.ConfigDict(json.loads(settings))
    return workers.commit_workers(task_d, tokenizer, tasks).path

  options = pipeline_options.PipelineOptions(beam_args)
  with beam.Pipeline(options=options) as p:
    _ = (p | "tasks" >> beam.Create(list(range(tasks)))
         | "reshuffle" >> beam.Reshuffle()  # spread the tasks over the workers
         | "build units" >> beam.Map(run_task)
         | "all done" >> beam.combiners.ToList()
         | "commit" >> beam.Map(commit))
  return cache.load(cache.entry_path(d, cache.key(d, tokenizer, sources.open_corpus(d))), d)
