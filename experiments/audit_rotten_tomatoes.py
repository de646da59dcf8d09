"""One data audit of Rotten Tomatoes with a cheap text model: counts and a sample of each type.

    python -m experiments.audit_rotten_tomatoes [--eps=0.05] [--samples=3]

Exact duplicates and train/test leakage come from the token sequences of ``load_rotten_tomatoes()``
(the dataset the experiments train on; pads dropped, as ``dedup.first``). Embeddings: TF-IDF of
word unigrams and bigrams reduced to 256 dimensions by truncated SVD (fitted on the training split).
Out-of-fold probabilities: 5-fold stratified logistic regression on the TF-IDF features. Then
:func:`prunejax.audit.audit` with its defaults (cleanlab's ``prune_by_noise_rate``, SemDeDup at
``--eps``, Datalab's outlier rule). About a minute on the 2-core CPU; no download.
"""

from __future__ import annotations

import numpy as np
from absl import app, flags

from prunejax import audit
from prunejax.data import datasets

FLAGS = flags.FLAGS
flags.DEFINE_float("eps", 0.05, "SemDeDup threshold (cosine distance) for near duplicates.")
flags.DEFINE_integer("samples", 3, "Examples printed per issue type.")
flags.DEFINE_integer("seed", 0, "Seeds the folds, the SVD and k-means.")


def features_and_probs(texts_tr: list[str], labels_tr: np.ndarray, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.decomposition import TruncatedSVD
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold, cross_val_predict
  tfidf = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform(texts_tr)
  emb = TruncatedSVD(256, random_state=seed).fit_transform(tfidf).astype(np.float32)
  probs = cross_val_predict(LogisticRegression(max_iter=1000, C=2.0), tfidf, labels_tr,
                            cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                            method="predict_proba")
  return emb, probs


def main(argv):
  del argv
  ds = datasets.load_rotten_tomatoes()
  tr, te = ds.train, ds.test
  ids = np.sort(tr.ids)
  texts = ds.texts["train"]
  emb, probs = features_and_probs([texts[i] for i in ids.tolist()], tr.labels(ids), FLAGS.seed)
  # A text with no n-gram seen twice has a zero TF-IDF row: give it a random direction of its own,
  # so that it is nobody's near duplicate (a common vector would make them one near-duplicate set).
  empty = np.linalg.norm(emb, axis=1) < 1e-9
  emb[empty] = np.random.default_rng(FLAGS.seed).normal(size=(int(empty.sum()), emb.shape[1]))
  print(f"{int(empty.sum())} training texts share no n-gram with another (random embeddings)")
  te_ids = np.sort(te.ids)
  result = audit.audit(ids, labels_N=tr.labels(ids), probs_NxC=probs, embeddings_NxD=emb,
                       content=tr.read(ids)["x"], kind="tokens", pad_id=ds.meta["pad_id"],
                       test_ids=te_ids, test_content=te.read(te_ids)["x"],
                       near_duplicate_eps=FLAGS.eps, seed=FLAGS.seed)
  print(audit.summary_markdown(result))
  te_texts = ds.texts["test"]
  g, p = result.given_label, result.predicted_label
  row = {int(i): k for k, i in enumerate(result.ids)}
  for t in result.is_issue:
    print(f"\n{t}: {result.summary[t]}")
    for i in result.top(t, FLAGS.samples).tolist():
      extra = ""
      if t == "leakage":
        extra = f" = test id {int(result.leakage_pairs[result.leakage_pairs[:, 0] == i, 1][0])}"
      for sets in ((result.exact_duplicate_sets if t == "exact_duplicate" else
                    result.near_duplicate_sets if t == "near_duplicate" else [])):
        if i in sets:
          extra = " set: " + " | ".join(repr(texts[int(m)][:70]) for m in sets)
      print(f"  id {i} (given {g[row[i]]}, predicted {p[row[i]]}): {texts[i][:110]!r}{extra}")
  leaks = result.leakage_pairs
  if len(leaks):
    i, j = leaks[0]
    print(f"\nfirst leak: train {texts[int(i)]!r} / test {te_texts[int(j)]!r}")


if __name__ == "__main__":
  app.run(main)
