"""``python -m analysis predictors --trace TEST --train TRAIN``: how well each predictor names the experts a
token will use d layers later (d = 1..4), per layer and overall.

Recall@k (batch size 1): of the k experts a token truly uses at layer l+d, the share among the predictor's top
k scores, predicting from layer l of the same token. Predictors see the tokens in trace order and get each
layer's true routing as feedback, as in a replay. Only pairs with l+d inside the same token are scored.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from policies.base import Observation, PredictorContext
from traces import read_trace
from traces.cli import plain
from traces.io import atomic_path

from .errors import AnalysisError
from .render import md_table as _md_table

DEFAULT = ("routing_path", "hybrid", "pregate", "transition", "frequency", "last_token")
CLASSES = {
    "routing_path": "policies.predictors.routing_path.RoutingPathPredictor",
    "hybrid": "policies.predictors.hybrid.HybridPredictor",
    "pregate": "policies.predictors.pregate.PreGatePredictor",
    "transition": "policies.predictors.transition.TransitionPredictor",
    "frequency": "policies.predictors.frequency.FrequencyPredictor",
    "last_token": "policies.predictors.last_token.LastTokenPredictor",
}


def make(name: str):
    import importlib

    mod, cls = CLASSES[name].rsplit(".", 1)
    return getattr(importlib.import_module(mod), cls)()


def recall_table(test, train, names=DEFAULT, max_distance: int = 4, log=None) -> pd.DataFrame:
    """Recall per predictor, distance and layer. Progress goes to ``log`` (stderr by default): a bar per
    predictor over the tokens (every distance is scored in the same pass), then its recall per distance."""
    from tqdm import tqdm

    log = log or sys.stderr
    meta = test.meta
    L, K = meta.num_layers, meta.top_k
    hidden = test.hidden_states() if test.has_hidden_states() else None
    rows = []
    for i, name in enumerate(names, 1):
        pred = make(name)
        if pred.needs_hidden and hidden is None:
            print(f"predictors: {i}/{len(names)} {name}: skipped (needs hidden states; the trace has none)", file=log)
            continue
        t0 = time.perf_counter()
        pred.reset(PredictorContext(meta.num_experts, K, train=train, layer_offsets=meta.layer_offsets,
                                    model_path=meta.model_path))
        hits = np.zeros((max_distance + 1, L))
        count = np.zeros((max_distance + 1, L))
        bar = tqdm(range(test.num_tokens), desc=f"predictors: {i}/{len(names)} {name}, d=1..{max_distance}",
                   unit="token", file=log, leave=False, mininterval=1.0)
        for t in bar:
            tok = np.array([t])
            for layer in range(L):
                obs = Observation(t * L + layer, t, layer, tok, test.experts[tok, layer], test.token_id[tok],
                                  None if hidden is None else np.asarray(hidden[tok, layer], np.float32),
                                  test.seq_id[tok])
                pred.observe(obs)
                for d in range(1, min(max_distance, L - 1 - layer) + 1):
                    top = np.argsort(-pred.predict(obs, d), kind="stable")[:K]
                    hits[d, layer] += len(set(top.tolist()) & set(test.experts[t, layer + d].tolist()))
                    count[d, layer] += K
        for d in range(1, max_distance + 1):
            for layer in range(L):
                if count[d, layer]:
                    rows.append({"predictor": name, "distance": d, "layer": layer, "recall": hits[d, layer] / count[d, layer]})
        per_d = [f"d={d} {np.mean(hits[d][count[d] > 0] / count[d][count[d] > 0]):.3f}"  # as the summary: mean over layers
                 for d in range(1, max_distance + 1) if count[d].sum()]
        print(f"predictors: {i}/{len(names)} {name}: recall {', '.join(per_d)} ({time.perf_counter() - t0:.0f} s)",
              file=log)
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    return df.groupby(["predictor", "distance"])["recall"].mean().unstack("distance").round(3)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predictors", help="recall of each predictor per layer distance and layer",
                              description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, required=True, help="the split to score (e.g. data/reference-moe/test.parquet)")
    p.add_argument("--train", type=Path, required=True, help="the split learned predictors fit on")
    p.add_argument("--predictors", default=",".join(DEFAULT))
    p.add_argument("--out", type=Path, help="also write recall.csv and recall.md here")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.predictors.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CLASSES))
    if unknown:
        raise AnalysisError(f"--predictors: unknown {unknown}; expected some of {sorted(CLASSES)}")
    df = recall_table(read_trace(args.trace), read_trace(args.train), names)
    table = summary(df)
    k = read_trace(args.trace).meta.top_k
    text = f"recall@{k} by layer distance d (mean over layers)\n\n{_md_table(table.reset_index())}\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out / "recall.csv") as tmp:
            df.to_csv(tmp, index=False)
        per_layer = df.pivot_table(index=["predictor", "distance"], columns="layer", values="recall").round(3)
        with atomic_path(args.out / "recall.md") as tmp:
            tmp.write_text(text + "\nper layer:\n\n" + _md_table(per_layer.reset_index()) + "\n")
    return 0
