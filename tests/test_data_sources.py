"""Document sources (embedded, local files, TFDS), held-out validation documents, bad input."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from gptjax.data import sources
from gptjax.data.errors import DataError


def data_config(**overrides):
  d = tiny.get_config().data
  d.val_fraction = 0.25
  for key, value in overrides.items():
    d[key] = value
  return d


def split_texts(corpus):
  out = {sources.TRAIN: [], sources.VAL: []}
  for split, text in corpus.documents():
    out[split].append(text)
  return out


# ---- embedded -----------------------------------------------------------------------------------
def test_embedded_corpus_has_prose_and_code_in_a_fixed_order():
  docs = list(sources.embedded_documents())
  assert len(docs) > 1000
  assert docs == list(sources.embedded_documents())
  assert any("def " in t and "import " in t for t in docs[:20])  # standard library sources
  assert any(t.startswith("The \"for\" statement\n") for t in docs)  # pydoc topics
  corpus = sources.open_corpus(data_config(source="embedded", max_docs=40, val_fraction=0.1))
  texts = split_texts(corpus)
  assert (len(texts["train"]), len(texts["val"])) == (36, 4)


# ---- held-out split -----------------------------------------------------------------------------
def test_validation_documents_are_whole_disjoint_and_evenly_spread(tmp_path):
  docs = [f"document number {i} says {'word ' * (i % 7)}" for i in range(200)]
  for i, text in enumerate(docs):
    (tmp_path / f"{i:03d}.txt").write_text(text)
  corpus = sources.open_corpus(data_config(source="files", paths=str(tmp_path / "*.txt"),
                                           val_fraction=0.1))
  texts = split_texts(corpus)
  assert len(texts["val"]) == 20 and len(texts["train"]) == 180
  assert sorted(texts["train"] + texts["val"]) == sorted(docs)  # whole documents, none lost
  assert not set(texts["train"]) & set(texts["val"])
  val_positions = [docs.index(t) for t in texts["val"]]
  assert val_positions == list(range(9, 200, 10))
  assert split_texts(corpus) == texts  # deterministic


# ---- local files --------------------------------------------------------------------------------
def test_txt_per_file_and_per_blank_line(tmp_path):
  (tmp_path / "a.txt").write_text("first para\nline two\n\n  \nsecond para\n")
  (tmp_path / "b.txt").write_text("only one")
  whole = sources.open_corpus(data_config(source="files", paths=str(tmp_path / "*.txt"),
                                          val_fraction=0.0))
  assert split_texts(whole)["train"] == ["first para\nline two\n\n  \nsecond para\n", "only one"]
  paras = sources.open_corpus(data_config(source="files", paths=str(tmp_path / "*.txt"),
                                          txt_split="blank_line", val_fraction=0.0))
  assert split_texts(paras)["train"] == ["first para\nline two", "second para\n", "only one"]


def test_jsonl_parquet_and_several_globs(tmp_path):
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

  (tmp_path / "x.jsonl").write_text(
      "\n".join(json.dumps({"body": f"json doc {i}", "id": i}) for i in range(3)) + "\n\n")
  pq.write_table(pa.table({"body": ["parquet doc 0", "parquet doc 1"]}), tmp_path / "y.parquet")
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "z.jsonl").write_text(json.dumps({"body": "nested"}) + "\n")
  paths = f"{tmp_path}/*.jsonl, {tmp_path}/**/*.parquet,{tmp_path}/**/*.jsonl"
  corpus = sources.open_corpus(data_config(source="files", paths=paths, text_key="body",
                                           val_fraction=0.0, max_docs=5))
  assert split_texts(corpus)["train"] == ["json doc 0", "json doc 1", "json doc 2",
                                          "parquet doc 0", "parquet doc 1"]
  files = sources.expand_paths(paths)
  assert [f.rsplit("/", 1)[1] for f in files] == ["x.jsonl", "y.parquet", "z.jsonl"]


@pytest.mark.parametrize("paths, message", [
    ("", "config.data.paths: is empty"),
    ("{tmp}/missing.txt", "does not exist"),
    ("{tmp}/*.nothing", "matches no files"),
    ("{tmp}", "is a directory"),
    ("{tmp}/notes.md", "is not a .txt/.jsonl/.parquet file"),
])
def test_bad_paths_fail_early_naming_the_setting(tmp_path, paths, message):
  (tmp_path / "notes.md").write_text("markdown")
  with pytest.raises(DataError, match="config.data.paths") as e:
    sources.open_corpus(data_config(source="files", paths=paths.format(tmp=tmp_path)))
  assert message in str(e.value)


def test_jsonl_record_without_text_field_names_file_line_and_setting(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "fine"}\n{"content": "oops"}\n')
  corpus = sources.open_corpus(data_config(source="files", paths=str(path), val_fraction=0.0))
  with pytest.raises(DataError, match=r"config.data.text_key: .*d.jsonl:2 has no field 'text' "
                     r"\(it has \['content'\]\)"):
    list(corpus.documents())
  path.write_text('{"text": "fine"}\nnot json\n')
  with pytest.raises(DataError, match=r"d.jsonl:2 is not valid JSON"):
    list(corpus.documents())


def test_bad_settings(tmp_path):
  (tmp_path / "a.txt").write_text("x")
  with pytest.raises(DataError, match="config.data.source: unknown source 'web'"):
    sources.open_corpus(data_config(source="web"))
  with pytest.raises(DataError, match="config.data.txt_split"):
    sources.open_corpus(data_config(source="files", paths=str(tmp_path / "a.txt"),
                                    txt_split="lines"))
  with pytest.raises(DataError, match="config.data.val_fraction"):
    sources.open_corpus(data_config(val_fraction=1.0))


# ---- TFDS ---------------------------------------------------------------------------------------
class TinyText(tfds.core.GeneratorBasedBuilder):
  """A local dataset built without TensorFlow or downloads (array_record files)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "id": tfds.features.Scalar(dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train", 12),
            "validation": self._generate_examples("validation", 3)}

  def _generate_examples(self, split, n):
    for i in range(n):
      yield f"{split}{i}", {"text": f"{split} document {i}: héllo", "id": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  TinyText(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_uses_its_validation_split(tfds_dir):
  corpus = sources.open_corpus(data_config(source="tfds", tfds_name="tiny_text",
                                           tfds_data_dir=tfds_dir))
  texts = split_texts(corpus)
  assert sorted(texts["train"]) == sorted(f"train document {i}: héllo" for i in range(12))
  assert sorted(texts["val"]) == sorted(f"validation document {i}: héllo" for i in range(3))
  assert corpus.fingerprint["version"] == "1.0.0"


def test_tfds_holds_out_train_documents_without_a_validation_split(tfds_dir):
  corpus = sources.open_corpus(data_config(source="tfds", tfds_name="tiny_text", max_docs=8,
                                           tfds_data_dir=tfds_dir, tfds_val_split=""))
  texts = split_texts(corpus)
  assert (len(texts["train"]), len(texts["val"])) == (6, 2)
  assert all(t.startswith("train") for t in texts["train"] + texts["val"])
  assert not set(texts["train"]) & set(texts["val"])


def test_tfds_errors(tfds_dir, tmp_path):
  def open_tfds(**kw):
    return sources.open_corpus(data_config(source="tfds", **{"tfds_data_dir": tfds_dir, **kw}))

  with pytest.raises(DataError, match="config.data.tfds_name: TFDS knows no dataset 'no_such_set'"):
    open_tfds(tfds_name="no_such_set")
  with pytest.raises(DataError, match="config.data.tfds_name: dataset 'mnist' is not prepared.*"
                     "tfds build mnist"):
    open_tfds(tfds_name="mnist", tfds_data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"config.data.tfds_val_split: .*no split 'dev'.*"
                     r"tfds_val_split=''"):
    open_tfds(tfds_name="tiny_text", tfds_val_split="dev")
  with pytest.raises(DataError, match=r"config.data.text_key: .*no feature 'body' "
                     r"\(it has \['id', 'text'\]\)"):
    open_tfds(tfds_name="tiny_text", text_key="body")
  with pytest.raises(DataError, match="config.data.tfds_name: is empty"):
    open_tfds(tfds_name="")
