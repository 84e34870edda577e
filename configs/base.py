"""Every setting of gptjax, declared once with what it means and its unit.

Presets (gpt1.py, gpt2.py, gpt3.py, tiny.py) start from `get_config()` and override what differs.
The returned config is locked: assigning a key that is not declared here is an error, so a typo in
`--config.optim.peak_lr` fails loudly instead of adding a new key.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"  # preset name, recorded in the workdir and in run names
  c.seed = 0  # one seed for init, data order and dropout

  # ---- model (gptjax/layers.py ModelArgs) --------------------------------------------------------
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 50257  # real tokenizer vocabulary; set from the tokenizer when it is trained
  m.pad_vocab_to = 128  # round embedding/output rows up to a multiple of this (1 = exact vocab)
  m.ctx = 1024  # maximum sequence length = rows of the learned position table
  m.n_layers = 12  # transformer blocks
  m.d_model = 768  # residual stream width
  m.n_heads = 12  # attention heads
  m.d_head = 0  # width of one head; 0 = d_model // n_heads
  m.d_ff = 0  # MLP hidden width; 0 = 4 * d_model
  m.norm = "pre"  # 'pre' (GPT-2/3: LN before each sub-block + final LN) or 'post' (GPT-1)
  m.ln_eps = 1e-5  # LayerNorm epsilon
  m.tie_embeddings = True  # output projection = token embedding transposed
  m.attention = "dense"  # 'dense', or 'alternating' (GPT-3: dense, banded, dense, banded, ...)
  m.local_window = 256  # tokens a banded layer attends to (itself and the window-1 before it)
  m.attention_impl = "auto"  # attention kernel: 'auto' (cudnn on GPU, splash on TPU, blocked on
  #   CPU; 'xla' when training with attn_dropout > 0), 'blocked' (gptjax's causal blocks), 'xla'
  #   (one masked product), 'cudnn' (GPU, bfloat16) or 'splash' (TPU); see gptjax/attention.py
  m.embd_dropout = 0.1  # dropout on token + position embeddings
  m.attn_dropout = 0.1  # dropout on attention probabilities
  m.resid_dropout = 0.1  # dropout on each sub-block's output before the residual add
  m.init_std = 0.02  # N(0, init_std) weights; residual projections: init_std / sqrt(2 * n_layers)
  m.parametrization = "sp"  # 'sp' (standard, GPT-2's) or 'mup' (maximal update: the learning rate
  #   tuned at mup_base_width holds at every width; gptjax/mup.py has the rules)
  m.mup_base_width = 0  # µP: the d_model the hyperparameters were tuned at (must divide d_model)
  m.mup_base_d_head = 0  # µP: the base model's d_head; 0 = d_head * mup_base_width / d_model
  m.scan_layers = True  # nn.scan over layers (fast compile) instead of an unrolled Python loop
  m.remat = "none"  # activation checkpointing: 'none', 'full', 'dots', 'dots_no_batch', 'qkv_attn'
  m.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16' (params and loss stay float32)

  # ---- data (gptjax/data/) -----------------------------------------------------------------
  d = c.data = ml_collections.ConfigDict()
  d.source = "embedded"  # 'embedded' (text shipped with Python: no download), 'files', 'tfds' or
  #                         'hf' (Hugging Face datasets: local files or a dataset name)
  d.paths = ""  # source 'files': comma-separated globs of .txt / .jsonl / .parquet files
  d.text_key = "text"  # field holding the text in .jsonl / .parquet records and TFDS examples
  d.txt_split = "file"  # .txt files: 'file' = one document per file, 'blank_line' = per paragraph
  d.tfds_name = ""  # source 'tfds': dataset name, e.g. 'lm1b', 'c4/en', 'wikipedia/20230601.en'
  d.tfds_data_dir = ""  # where the TFDS dataset was prepared ('' = TFDS default)
  d.tfds_train_split = "train"  # TFDS split for training
  d.tfds_val_split = "validation"  # TFDS split for validation ('' = hold out val_fraction of train)
  d.hf_name = ""  # source 'hf': Hugging Face dataset name (or local dataset folder), 'wikitext'
  d.hf_config = ""  # source 'hf': the dataset's config, e.g. 'wikitext-103-raw-v1' ('' = default)
  d.hf_files = ""  # source 'hf': instead of hf_name, globs of .parquet / .json(l) / .arrow files
  d.hf_val_files = ""  # source 'hf' with hf_files: globs of the val files ('' = hold out)
  d.hf_train_split = "train"  # source 'hf' with hf_name: split for training
  d.hf_val_split = ""  # source 'hf' with hf_name: split for validation ('' = hold out val_fraction)
  d.hf_cache_dir = ""  # datasets' cache ('' = $HF_DATASETS_CACHE or ~/.cache/huggingface/datasets)
  d.hf_streaming = False  # source 'hf': tokenize while streaming, no token cache (needs val split)
  d.hf_shuffle_buffer = 0  # hf_streaming: train windows shuffled in seeded blocks of N (0 = off)
  d.val_fraction = 0.01  # fraction of documents held out for validation (never split inside a doc)
  d.max_docs = 0  # use at most this many documents (0 = all)
  d.cache_dir = ""  # tokenized-data cache ('' = $GPTJAX_CACHE or ~/.cache/gptjax)
  d.shard_chars = 1 << 25  # characters of documents per cache shard (~8M tokens): the work unit
  d.build_workers = 0  # processes building the cache (0 = one per core; one if the tokenizer
  #                      is multi-threaded); scripts/prepare_data.py --num_workers for many hosts
  d.verify_shards = True  # check every shard's sha256 against the manifest when a run opens it
  # A weighted mixture (gptjax/data/mixture.py): name -> ConfigDict(weight=..., and the data.*
  # settings where that source differs, e.g. source='files', paths='web/*.jsonl'); empty = the
  # one source above. Validation is per source (eval/<name>/val_loss, .../bits_per_byte).
  d.mixture = ml_collections.ConfigDict()
  d.mixture_stages = ""  # weights from given steps on: 'STEP:NAME=W,NAME=W; STEP:...'
  d.document_mask = False  # segment ids (attention stays in a document) and per-document positions
  d.worker_count = 0  # Grain worker processes (0 = read in the main process)
  d.prefetch = 2  # batches prepared ahead of the step
  tk = d.tokenizer = ml_collections.ConfigDict()
  tk.kind = "sentencepiece"  # 'sentencepiece' or 'gpt2_bpe' (local vocab.json + merges.txt)
  tk.path = ""  # existing .model file, or folder with vocab.json + merges.txt; '' = train one
  tk.vocab_size = 8192  # vocabulary of a newly trained SentencePiece model
  tk.model_type = "bpe"  # SentencePiece algorithm: 'bpe' or 'unigram'
  tk.train_chars = 20_000_000  # characters of the source sampled to train the tokenizer

  # ---- training (gptjax/train.py, gptjax/loop.py) -------------------------------------------
  t = c.train = ml_collections.ConfigDict()
  t.seq_len = 0  # tokens per training sequence; 0 = model.ctx
  t.global_batch = 512  # sequences per optimizer step, over all devices and micro-batches
  t.micro_batch = 0  # sequences per forward/backward over all devices; 0 = global_batch (or, with
  #                    optim.batch_ramp_tokens, the ramp's start: optim.micro_batch resolves it)
  t.steps = 1000  # optimizer steps in the run (if tokens > 0, tokens decides instead)
  t.tokens = 0  # tokens in the run (0 = use steps)
  t.log_every = 10  # steps between metric fetches from the device (no host sync in between)
  t.eval_every = 200  # steps between validation passes (0 = only at the end)
  t.eval_batches = 10  # global batches per validation pass
  t.z_loss = 0.0  # weight of the z-loss (log Z)^2 that keeps the softmax normaliser near 1
  # Tokens per chunk of the fused output projection + loss: [rows, V] float32 logits at a time
  # (512 suits CPU caches; configs/accelerators.py raises it on GPUs and TPUs).
  t.loss_chunk_rows = 512
  t.sample_tokens = 64  # tokens generated at the end of the run (0 = no samples)
  t.progress = True  # tqdm progress bar on process 0
  t.nonfinite = "stop"  # NaN/inf loss or grad: 'stop' (keep checkpoints, exit) or 'skip' the update
  t.max_skips = 10  # 'skip': abort after this many consecutive non-finite steps
  # JAX's persistent compilation cache (gptjax/compile_cache.py): 'auto' = <cache root>/jax_compile
  # (or $JAX_COMPILATION_CACHE_DIR if set), a folder, or 'off'. A rerun loads its executables.
  t.compile_cache = "auto"
  t.compile_cache_min_s = 1.0  # only compilations that took at least this long are stored
  # (start, length): trace optimizer steps start .. start+length-1 (0-based) with jax.profiler
  # into <workdir>/profile/ (TensorBoard's profile plugin, Perfetto); (0, 0) = off.
  t.profile_steps = (0, 0)
  # Experiment trackers (gptjax/trackers.py): any of 'tensorboard', 'wandb', 'mlflow',
  # comma-separated, besides metrics.jsonl ('' = metrics.jsonl only).
  t.trackers = "tensorboard"
  t.run_name = ""  # the tracked run's name ('' = the workdir's name; a sweep: the run's name)
  t.run_group = ""  # W&B group / MLflow experiment ('' = none; a sweep: the sweep's name)
  t.wandb_project = ""  # '' = $WANDB_PROJECT, else 'gptjax'
  t.wandb_entity = ""  # '' = $WANDB_ENTITY or the logged-in user's default
  t.wandb_mode = ""  # '' = W&B's default ($WANDB_MODE); 'offline' writes <workdir>/wandb/
  t.mlflow_uri = ""  # '' = $MLFLOW_TRACKING_URI; an http:// server, sqlite:///x.db, file:///path
  t.mlflow_experiment = ""  # '' = the run group, else 'gptjax'

  # ---- downstream evaluation during training (gptjax/eval_tasks.py) -------------------------
  e = c.eval = ml_collections.ConfigDict()
  e.tasks = ""  # 'name:path:kind[:fewshot],...' (mc, lambada, ppl) run every eval_every; ''=none
  e.shots = 0  # few-shot demonstrations before each example (0 = zero-shot)
  e.seed = 0  # seed of the few-shot draw
  e.harness_tasks = ""  # lm-evaluation-harness tasks run every eval_every, comma-separated (the
  #   eval extra); logged as eval/harness/<task>/<metric> (gptjax/harness.py)
  e.harness_include = ""  # a folder of lm-eval task YAML files (local tasks), as --include_path
  e.harness_limit = 0  # examples per harness task (0 = all)

  # ---- fine-tuning (gptjax/finetune.py, scripts/finetune.py) -------------------------------
  f = c.finetune = ml_collections.ConfigDict()
  f.base = ""  # pre-trained model: a gptjax run's workdir or a local HF GPT-2 folder (''=random)
  f.task = "classify"  # classify, entail, similarity, multiple_choice, token_classify or sft
  f.train_path = ""  # JSON Lines file of training examples (formats: gptjax/data/sft.py)
  f.val_path = ""  # JSON Lines file of held-out examples ('' = no evaluation)
  f.text_fields = "text"  # record field(s) of the text; two, comma-separated, for entail/similarity
  f.label_field = "label"  # record field of the label (multiple_choice: the right choice's index)
  f.choices_field = "choices"  # multiple_choice: record field listing the candidate answers
  f.classes = "0,1"  # comma-separated class names; every label must be one of them
  f.delimiter = "\n"  # text between the two parts of a pair (entail, similarity, multiple_choice)
  f.template = "{prompt}"  # sft: the prompt, str.format-ted with the record's fields
  f.completion_field = "completion"  # sft: record field of the completion (the only loss)
  f.pack = True  # sft: pack examples into sequences, kept apart by segment ids
  f.epochs = 0.0  # passes over the training set; > 0 sets train.steps (GPT-1: 3)
  f.warmup_fraction = 0.0  # > 0: optim.warmup_steps = this fraction of the run (GPT-1: 0.002)
  f.head_dropout = 0.1  # dropout before the task head (GPT-1: 0.1)
  f.aux_lm_weight = 0.0  # λ: loss = task loss + λ · LM loss on the task's text (GPT-1: 0.5)
  f.peft = "none"  # 'none', or a method that freezes the base: 'lora', 'adapters', 'prefix'
  f.freeze = ""  # peft 'none': regex over parameter paths to freeze (e.g. 'wte|wpe'); '' = none
  f.adapter_dim = 64  # peft 'adapters': bottleneck width of each Houlsby adapter
  f.prefix_len = 10  # peft 'prefix': learned key/value positions per layer
  f.match_examples = 0  # sft: greedy-decode this many val prompts per eval for exact match
  lo = f.lora = ml_collections.ConfigDict()
  lo.rank = 8  # r: rank of the update A·B
  lo.alpha = 16.0  # the update is scaled by alpha / r
  lo.targets = "attn/qkv"  # regex over module paths, e.g. 'attn/qkv' (q, k, v share one kernel)

  # ---- checkpoints (gptjax/checkpoint.py) --------------------------------------------------
  ck = c.checkpoint = ml_collections.ConfigDict()
  ck.save_every = 500  # steps between checkpoints (the run's end is always saved; 0 = end only)
  ck.keep = 3  # most recent checkpoints kept
  ck.keep_best = 1  # also keep this many best by validation loss (0 = off)
  ck.async_save = True  # write checkpoints in the background while training goes on
  ck.restore_from = ""  # start from another run's weights (not its optimizer): its workdir
  ck.start_over = False  # True: start at step 0 when every checkpoint was unreadable (moved aside)

  # ---- optimizer (gptjax/optim.py) ----------------------------------------------------------
  o = c.optim = ml_collections.ConfigDict()
  o.peak_lr = 6e-4  # learning rate at the end of warmup
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.95  # Adam beta2 (GPT-3)
  o.eps = 1e-8  # Adam epsilon
  o.weight_decay = 0.1  # decoupled weight decay (AdamW) on matrices only
  o.decay_embeddings = False  # also decay token/position embeddings
  o.clip_norm = 1.0  # global gradient-norm clip (0 = off)
  o.schedule = "cosine"  # 'cosine', 'linear', 'constant', 'rsqrt' or 'wsd' (warmup-stable-decay)
  o.warmup_steps = 0  # linear warmup length in steps (or use warmup_tokens)
  o.warmup_tokens = 0  # linear warmup length in tokens (GPT-3: 375M); overrides warmup_steps
  o.decay_steps = 0  # steps until the schedule reaches its floor; 0 = the end of the run
  o.decay_tokens = 0  # the same in tokens (GPT-3: 260B); overrides decay_steps
  o.final_lr_fraction = 0.1  # floor of the decay, as a fraction of peak_lr (GPT-3: 0.1)
  o.wsd_decay_fraction = 0.2  # 'wsd': fraction of the run spent in the final linear decay
  o.batch_ramp_tokens = 0  # GPT-3 batch ramp: batch grows linearly over this many tokens (0 = off)
  o.batch_ramp_start = 32768  # batch size in tokens at the start of the ramp (GPT-3: 32k)
  o.batch_ramp_buckets = 4  # distinct batch sizes on the ramp (each compiles once)

  # ---- compression (gptjax/quantize.py, gptjax/distill.py, gptjax/prune.py) ------------------
  cp = c.compress = ml_collections.ConfigDict()
  qat = cp.qat = ml_collections.ConfigDict()
  qat.enabled = False  # quantization-aware training: Linears see fake-quantized weights (Qwix)
  qat.bits = 8  # QAT weight bits: 8 (int8) or 4 (int4)
  qat.group_size = 0  # weights per scale along the contraction axis (0 = one per output channel)
  qat.activations = False  # also quantize each Linear's input to int8 (dynamic, per token)
  kd = cp.distill = ml_collections.ConfigDict()
  kd.teacher = ""  # workdir of a trained teacher with the same tokenizer ('' = no distillation)
  kd.alpha = 0.5  # loss = (1 - alpha) * LM loss + alpha * T^2 * KL(teacher_T || student_T)
  kd.temperature = 1.0  # T: both next-token distributions are softened by it (> 1 = softer)
  pr = cp.prune = ml_collections.ConfigDict()
  pr.method = "none"  # 'none', 'magnitude' (unstructured) or '2:4' (2 of every 4 inputs are zero)
  pr.sparsity = 0.5  # 'magnitude': fraction of each Linear kernel at zero once the ramp ends
  pr.begin_step = 0  # optimizer step where pruning starts (sparsity 0; '2:4' applies here)
  pr.end_step = 0  # step where 'magnitude' reaches its sparsity (0 = the run's last step)
  pr.power = 3.0  # exponent of the polynomial ramp: s(t) = sparsity * (1 - (1 - t/T)^power)

  # ---- device mesh (gptjax/sharding.py) ----------------------------------------------------
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # data-parallel axis size (-1 = all devices left over)
  mesh.fsdp = 1  # FSDP / ZeRO-3 axis: params, grads and optimizer state sharded over it
  mesh.tensor = 1  # Megatron tensor-parallel axis: heads, MLP and vocab sharded over it
  # Device order: the axes from slowest- to fastest-varying over the devices sorted by (process,
  # id). The default keeps tensor groups within a host (fast links) and spans hosts with data;
  # e.g. 'tensor,data,fsdp' makes the tensor axis span processes.
  mesh.order = "data,fsdp,tensor"
  # Logical axis -> mesh axes. One table serves DP, FSDP, TP and mixes (a size-1 axis is a no-op).
  r = mesh.rules = ml_collections.ConfigDict()
  r.batch = "data,fsdp"
  r.length = ""
  r.embed = "fsdp"
  r.heads = "tensor"
  r.kv = ""
  r.mlp = "tensor"
  r.vocab = "tensor"
  r.layers = ""
  return c


def from_size(family: str, name: str = "") -> ml_collections.ConfigDict:
  """The base config with model, batch and learning rate of one row of `configs/sizes.py`."""
  from configs import sizes  # pylint: disable=import-outside-toplevel

  s = sizes.lookup(family, name)
  c = get_config()
  c.name = f"{family}-{name}" if name else family
  c.model.n_layers, c.model.d_model = s.layers, s.d_model
  c.model.n_heads, c.model.d_head = s.heads, s.d_head
  c.model.ctx, c.model.vocab_size, c.model.norm = s.ctx, s.vocab, s.norm
  c.train.global_batch = s.batch
  c.optim.peak_lr = s.lr
  return c
