"""`tunewise monitor`: production queries (the serve log) against the training data.

- Drift: a two-sample test on the bundled embedding model's vectors of the latest `monitor.window` logged queries
  (the last user turn) and a seeded sample of training queries: the maximum mean discrepancy with a Gaussian kernel
  (bandwidth: the median distance), its p-value from `monitor.permutations` label permutations.
- Far queries: a query whose nearest training query is less similar (cosine) than the `far_quantile` of the
  training queries' own nearest-neighbour similarities; far queries are clustered greedily (a query joins the
  first cluster whose first query is at least `cluster_similarity` similar), the clusters shown largest first:
  candidate new intents.
- Surges: a query whose `neighbours` nearest queries (production and training pooled) hold more production
  queries than the two samples' sizes predict (a binomial tail, Benjamini-Hochberg at `surge_fdr` over all
  queries), clustered like the far ones, with what the model answered to each cluster: a topic production asks
  about far more than the training data has, e.g. a new intent whose queries look like old ones (close to
  training queries, so not far, but many of them together where training has few).
- Answers: for labelled data, the distribution of answered labels against the training labels (total-variation
  distance, and the share of answers that are no known label); the abstention rate.
- Service: latency p50/p95 and the error rate (requests the server logged as failed).
Alerts are the thresholds of `monitor` that are crossed; `tunewise monitor` exits 3 when there is one, so cron or
CI can alert. Writes `<run>/monitor/monitor.json` and `report.html`.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

import numpy as np

from .config import ProjectConfig
from .data.prodlog import RequestLog
from .errors import TunewiseError
from .results import MonitorReport
from .util import atomic_write_json, atomic_write_text


class MonitorError(TunewiseError, RuntimeError):
    pass


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int = 500, seed: int = 0) -> tuple[float, float]:
    """(MMD^2, permutation p-value) of two samples, Gaussian kernel with the median-distance bandwidth."""
    z = np.concatenate([x, y]).astype(np.float64)
    sq = np.maximum((z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T, 0)
    off = sq[np.triu_indices(len(z), 1)]
    bw = np.median(off) or 1.0
    k = np.exp(-sq / bw)
    n, m = len(x), len(y)

    def stat(labels: np.ndarray) -> float:
        a, b = labels, ~labels
        kxx = (k[np.ix_(a, a)].sum() - n) / (n * (n - 1))  # the diagonal (k = 1) left out: the unbiased estimate
        kyy = (k[np.ix_(b, b)].sum() - m) / (m * (m - 1))
        return float(kxx + kyy - 2 * k[np.ix_(a, b)].mean())

    labels = np.zeros(n + m, dtype=bool)
    labels[:n] = True
    observed = stat(labels)
    rng = np.random.default_rng(seed)
    hits = sum(stat(rng.permutation(labels)) >= observed for _ in range(permutations))
    return observed, (hits + 1) / (permutations + 1)


def _clusters(vecs: np.ndarray, texts: list[str], threshold: float, answers: list[str] | None = None) -> list[dict]:
    """Greedy clusters, largest first: size, examples, all member queries, and (with answers) the 3 commonest answers."""
    heads: list[int] = []
    members: list[list[int]] = []
    for i, v in enumerate(vecs):
        sims = [float(vecs[h] @ v) for h in heads]
        j = int(np.argmax(sims)) if sims else -1
        if j >= 0 and sims[j] >= threshold:
            members[j].append(i)
        else:
            heads.append(i)
            members.append([i])
    out = [{"size": len(m), "examples": [texts[i] for i in m[:5]], "queries": [texts[i] for i in m]}
           | ({"answers": Counter(answers[i] for i in m).most_common(3)} if answers is not None else {}) for m in members]
    return sorted(out, key=lambda c: -c["size"])


def _binomial_sf(c: int, n: int, p: float) -> float:
    """P(X >= c), X ~ Binomial(n, p)."""
    from math import comb

    return float(min(1.0, sum(comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(c, n + 1))))


def surges(prod_v: np.ndarray, ref_v: np.ndarray, k: int = 20, fdr: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the production queries in over-represented neighbourhoods, each query's production-neighbour
    count). Under the null (both samples from one distribution) a query's k nearest neighbours in the pooled set
    are production queries at the rate (n_p - 1) / (n_p + n_t - 1); a count that high or higher has a binomial tail
    probability, and Benjamini-Hochberg keeps the false discoveries among the flagged at `fdr`."""
    n_p, n_t = len(prod_v), len(ref_v)
    k = min(k, n_p + n_t - 1)
    sims = prod_v @ np.concatenate([prod_v, ref_v]).T
    sims[np.arange(n_p), np.arange(n_p)] = -np.inf
    nn = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    counts = (nn < n_p).sum(1)
    rate = (n_p - 1) / (n_p + n_t - 1)
    tail = {c: _binomial_sf(int(c), k, rate) for c in np.unique(counts)}
    p = np.array([tail[c] for c in counts])
    order = np.argsort(p, kind="stable")
    below = np.flatnonzero(p[order] <= fdr * np.arange(1, n_p + 1) / n_p)
    flagged = np.sort(order[: below[-1] + 1]) if len(below) else np.zeros(0, dtype=int)
    return flagged, counts


def _queries(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        conv = r.get("input")
        if isinstance(conv, list):
            out.append(next((t["content"] for t in reversed(conv) if t["role"] == "user"), ""))
        elif isinstance(conv, str):
            out.append(conv)
    return out


def _label_shift(labels: list[str], outputs: list[str], m, seed: int, alerts: list[str]) -> dict:
    """How far the answered labels are from the training labels' distribution (total variation, with a p-value from
    samples of the same size drawn from the training distribution), the share of answers that are no label, and the
    most answered labels beside their expected counts."""
    from .metrics import normalize_label

    known = {normalize_label(x): x for x in labels}
    train_dist = Counter(normalize_label(x) for x in labels)
    got = Counter(normalize_label(o) for o in outputs)
    keys = set(train_dist) | set(got)
    order = sorted(keys)
    q = np.array([train_dist[k] / len(labels) for k in order])
    tv = 0.5 * float(np.abs(q - np.array([got[k] / len(outputs) for k in order])).sum())
    # how far a sample of this size drawn from the training distribution itself falls: small samples of many
    # labels are far from any distribution, so the distance alone would alert on noise
    rng = np.random.default_rng(seed)
    null = 0.5 * np.abs(rng.multinomial(len(outputs), q, size=m.permutations) / len(outputs) - q).sum(1)
    p_labels = float(((null >= tv).sum() + 1) / (m.permutations + 1))
    unknown = sum(v for k, v in got.items() if k not in known) / len(outputs)
    found = {"total_variation": tv, "p_value": p_labels, "unknown_share": unknown,
             "top": [[known.get(k, k), v, round(train_dist[k] / len(labels) * len(outputs), 1)] for k, v in got.most_common(10)]}
    if tv > m.max_label_shift and p_labels < m.alert_p_value:
        alerts.append(f"labels: the answered labels are {tv:.2f} (total variation) from training's distribution "
                      f"(> {m.max_label_shift:g}, p = {p_labels:.4f})")
    return found


def run_monitor(cfg: ProjectConfig, log_dir: Path | None = None) -> MonitorReport:
    from .data.prepare import ensure_prepared
    from .data.split import sample_records
    from .models import load_tokenizer
    from .rag.answer import is_abstention
    from .rag.embed import Embedder

    m = cfg.monitor
    plog = RequestLog(Path(log_dir or cfg.serve_log_dir))
    rows = list(plog.requests.rows())[-m.window:]
    answered = [r for r in rows if "error" not in r]
    pairs = [(q, (r.get("outputs") or [""])[0]) for q, r in zip(_queries(answered), answered) if q.strip()]
    queries = [q for q, _ in pairs]
    out_dir = cfg.run_dir / "monitor"
    result: dict = {"log": str(plog.requests.dir), "requests": len(rows), "queries": len(queries), "alerts": []}
    if len(queries) < m.min_queries:
        result["verdict"] = f"too few logged queries to tell ({len(queries)} < monitor.min_queries={m.min_queries})"
        atomic_write_json(out_dir / "monitor.json", result)
        return MonitorReport.model_validate(result)
    train = ensure_prepared(cfg, load_tokenizer(cfg.model.name, cfg.data.template_kwargs)).splits["train"]
    ref = sample_records(train, m.samples)
    ref_q = [next((t["content"] for t in reversed(r.messages) if t["role"] == "user"), "") for r in ref]
    emb = Embedder(cfg.rag.embedding_model, cache=cfg.run_dir / "monitor" / "embeddings.sqlite", url=cfg.rag.embedding_url)
    prod_v, ref_v = emb.encode(queries), emb.encode(ref_q)
    emb.close()
    stat, p = mmd_test(prod_v, ref_v, m.permutations, cfg.data.split.seed)
    result["drift"] = {"mmd2": stat, "p_value": p, "test": f"MMD, Gaussian kernel, {m.permutations} permutations",
                       "production": len(queries), "training": len(ref_q)}
    if p < m.alert_p_value:
        result["alerts"].append(f"drift: the queries differ from the training queries (MMD p = {p:.4f} < {m.alert_p_value:g})")
    rr = ref_v @ ref_v.T
    np.fill_diagonal(rr, -1.0)
    threshold = float(np.quantile(rr.max(1), m.far_quantile))
    nearest = (prod_v @ ref_v.T).max(1)
    far = np.flatnonzero(nearest < threshold)
    share = len(far) / len(queries)
    result["far"] = {"threshold": threshold, "share": share, "count": int(len(far)),
                     "clusters": _clusters(prod_v[far], [queries[i] for i in far], m.cluster_similarity)}
    if share > m.max_far_share:
        result["alerts"].append(f"far queries: {share:.1%} of queries are far from every training query (> {m.max_far_share:.0%}); "
                                f"{len(result['far']['clusters'])} clusters, the largest: {result['far']['clusters'][0]['examples'][0]!r}")
    flagged, counts = surges(prod_v, ref_v, m.neighbours, m.surge_fdr)
    clusters = _clusters(prod_v[flagged], [queries[i] for i in flagged], m.cluster_similarity, [pairs[i][1] for i in flagged])
    s_share = len(flagged) / len(queries)
    result["surges"] = {"count": int(len(flagged)), "share": s_share, "neighbours": min(m.neighbours, len(queries) + len(ref_q) - 1),
                        "expected_share_of_neighbours": (len(queries) - 1) / (len(queries) + len(ref_q) - 1), "fdr": m.surge_fdr,
                        "clusters": clusters}
    if s_share > m.max_surge_share:
        result["alerts"].append(f"surges: {s_share:.1%} of queries sit where production asks far more than training has "
                                f"(> {m.max_surge_share:.0%}); {len(clusters)} clusters, the largest ({clusters[0]['size']}): "
                                f"{clusters[0]['examples'][0]!r}")
    outputs = [(r.get("outputs") or [""])[0] for r in answered]
    labels = [r.label for r in train if r.label]
    if labels:
        result["labels"] = _label_shift(labels, outputs, m, cfg.data.split.seed, result["alerts"])
    abst = sum(is_abstention(o) for o in outputs) / len(outputs)
    lat = [r.get("latency_ms", 0) / 1000 for r in answered]
    errors = (len(rows) - len(answered)) / len(rows)
    result["service"] = {"abstention_rate": abst, "error_rate": errors, "latency_p50_s": float(np.percentile(lat, 50)),
                         "latency_p95_s": float(np.percentile(lat, 95))}
    if abst > m.max_abstention:
        result["alerts"].append(f"abstention: {abst:.1%} of answers abstain (> {m.max_abstention:.0%})")
    if errors > m.max_error_rate:
        result["alerts"].append(f"errors: {errors:.1%} of requests failed (> {m.max_error_rate:.0%})")
    if m.max_p95_latency_s and result["service"]["latency_p95_s"] > m.max_p95_latency_s:
        result["alerts"].append(f"latency: p95 {result['service']['latency_p95_s']:.2f} s (> {m.max_p95_latency_s:g} s)")
    result["verdict"] = "alert" if result["alerts"] else "ok"
    atomic_write_json(out_dir / "monitor.json", result)
    report = MonitorReport.model_validate(result)
    report.report = str(_report(result, out_dir / "report.html"))
    return report


def _report(r: dict, out: Path) -> Path:
    from .report.page import document, table

    parts = [f"<h1>tunewise monitor: {html.escape(r['verdict'])}</h1>",
             f"<p>{r['queries']:,} logged queries (of {r['requests']:,} requests) against the training data.</p>"]
    if r["alerts"]:
        parts.append("<h2>Alerts</h2><ul>" + "".join(f"<li>{html.escape(a)}</li>" for a in r["alerts"]) + "</ul>")
    d = r["drift"]
    parts.append(f"<h2>Drift</h2><p>{html.escape(d['test'])}: MMD&sup2; {d['mmd2']:.5f}, p = {d['p_value']:.4f} "
                 f"({d['production']:,} production vs {d['training']:,} training queries).</p>")
    f = r["far"]
    parts.append(f"<h2>Far from the training data: {f['count']:,} queries ({f['share']:.1%})</h2>"
                 f"<p>Nearest training query less similar than {f['threshold']:.3f} (cosine). Clusters, largest first:</p>"
                 + table(["queries", "examples"], [[c["size"], " | ".join(c["examples"][:3])] for c in f["clusters"][:15]]))
    if "surges" in r:
        sg = r["surges"]
        parts.append(f"<h2>Surges: {sg['count']:,} queries ({sg['share']:.1%}) where production asks far more than training has</h2>"
                     f"<p>Among each query's {sg['neighbours']} nearest queries (production and training pooled), more production ones "
                     f"than the {sg['expected_share_of_neighbours']:.0%} the sample sizes predict (Benjamini-Hochberg, FDR {sg['fdr']:g}). "
                     "Clusters, largest first, with what the model answered: candidate new intents.</p>"
                     + table(["queries", "examples", "answered"], [[c["size"], " | ".join(c["examples"][:3]),
                                                                      ", ".join(f"{a} ({n})" for a, n in c["answers"])] for c in sg["clusters"][:15]]))
    if "labels" in r:
        lb = r["labels"]
        parts.append(f"<h2>Answered labels</h2><p>Total variation from training's distribution: {lb['total_variation']:.3f}; "
                     f"answers that are no known label: {lb['unknown_share']:.1%}.</p>"
                     + table(["label", "answered", "expected from training"], lb["top"]))
    s = r["service"]
    parts.append("<h2>Service</h2>" + table(["abstention", "errors", "latency p50 s", "latency p95 s"],
                                              [[f"{s['abstention_rate']:.1%}", f"{s['error_rate']:.1%}", f"{s['latency_p50_s']:.2f}", f"{s['latency_p95_s']:.2f}"]]))
    atomic_write_text(out, document("tunewise monitor", "".join(parts)))
    return out
