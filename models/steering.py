"""Bao-style plan steering: per query template, Thompson sampling over planner hint sets.

An *arm* is a set of planner switches turned off for one statement (`enable_nestloop = off`,
...); the stock planner is the arm with none. Per template, each arm's latency is modelled as
log-normal with a Normal-Inverse-Gamma posterior over the mean and variance of log latency
(Bao's Thompson sampling, with the posterior in closed form instead of a neural network: the
proxy sees every template's executions, so per-template posteriors are cheap and exact).

* `choose()` samples each live arm's expected latency from its posterior and takes the
  lowest. The expected latency of a log-normal is exp(mu + sigma^2 / 2), not its median
  exp(mu): a template's executions differ in their parameters, and an arm that speeds up the
  cheap ones while slowing the expensive ones has the lower median and the higher total. Users
  (and the bench) pay the total, so mu and sigma^2 are both drawn and the mean is compared;
* an arm whose log latency is above the stock arm's by more than `regression` with confidence
  (Welch's t above `t_retire`) is *retired* for that template;
* once one arm is the best in at least `confidence` of joint posterior draws, exploration stops
  and that arm is used (the template has *converged*). In those draws stock is given a head
  start of `min_gain`: another arm leads only where it is faster by that much, so arms that
  merely tie with stock (most of them, on most templates) end in stock, not in a coin flip
  among equals that the A/B trial must then undo; a holdout share still runs stock, and
  the A/B trial that judges the arm starts afresh (its samples and the holdout's cleared, so
  both come from the same period: latencies drift with the load).

Warm start (Bao's model, here the cost predictor's): when a template becomes eligible the proxy
EXPLAINs it under every arm and the cost model predicts each distinct plan's latency from its
features (`TemplateState.predicted`: log-ratio to stock's plan). A prediction can bring an arm
forward, never hold one back: an arm predicted faster has its posterior centred on stock's
observed mean plus that log-ratio (clipped to `prior_clip`), with the weight the model's own
error earns it (`prior_sd`: a log-latency sd from its held-out q-error), so it is tried first
and a few real executions outweigh a wrong prediction. An arm predicted slower starts as it
would without a model. The asymmetry is deliberate: the arms worth steering to are the
planner's mistakes, and a model that reads the planner's own estimates calls every one of them
slower (the misled `ORDER BY id LIMIT 20` of the tests costs 55x less under stock's plan and
runs 10x slower); letting that hold the arm back would keep the mistake.

Pure Python (the proxy calls it per eligible statement); `mann_whitney` is the A/B test the
proxy applies periodically off the hot path, comparing an arm with the holdout executions.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Bao's idea, PostgreSQL's switches: the stock planner plus hint sets that turn operators off
ARMS: dict[str, tuple[str, ...]] = {
    "stock": (),
    "no_nestloop": ("enable_nestloop",),
    "no_hashjoin": ("enable_hashjoin",),
    "no_mergejoin": ("enable_mergejoin",),
    "hash_only": ("enable_nestloop", "enable_mergejoin"),
    "no_indexscan": ("enable_indexscan", "enable_indexonlyscan"),
}
STOCK = "stock"


def set_sql(arm: str, custom_plan: bool = False) -> str:
    """The SETs that apply an arm (names come from ARMS only: no outside text reaches SQL).

    `custom_plan` is for a prepared statement: PostgreSQL plans it with the settings of the
    moment and may keep that plan, so it is forced to plan this execution afresh."""
    sets = [f"SET {name} = off" for name in ARMS[arm]]
    if custom_plan:
        sets.append("SET plan_cache_mode = force_custom_plan")
    return "; ".join(sets)


def reset_sql(arm: str, custom_plan: bool = False) -> str:
    names = list(ARMS[arm]) + (["plan_cache_mode"] if custom_plan else [])
    return "; ".join(f"RESET {name}" for name in names)


@dataclass(slots=True)
class ArmStats:
    """Running mean and variance of log latency (Welford)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, log_ms: float) -> None:
        self.n += 1
        d = log_ms - self.mean
        self.mean += d / self.n
        self.m2 += d * (log_ms - self.mean)

    @property
    def var(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else math.inf

    def sample_mean(
        self, rng: random.Random, prior_mean: float, prior_var: float, kappa0: float = 1.0
    ) -> float:
        """A draw of the log of the expected latency, mu + sigma^2 / 2, from the
        Normal-Inverse-Gamma posterior (`kappa0`: the prior mean's weight, in observations)."""
        alpha0 = 2.0
        beta0 = prior_var * (alpha0 - 1)
        kappa = kappa0 + self.n
        mu = (kappa0 * prior_mean + self.n * self.mean) / kappa
        alpha = alpha0 + self.n / 2
        beta = beta0 + 0.5 * self.m2
        if self.n:
            beta += kappa0 * self.n * (self.mean - prior_mean) ** 2 / (2 * kappa)
        sigma2 = beta / rng.gammavariate(alpha, 1.0)  # inverse-gamma draw
        return rng.gauss(mu, math.sqrt(sigma2 / kappa)) + sigma2 / 2


@dataclass
class TemplateState:
    """One template's bandit: arms, retirements, convergence."""

    arms: dict[str, ArmStats] = field(default_factory=lambda: {a: ArmStats() for a in ARMS})
    retired: set[str] = field(default_factory=set)
    converged: str | None = None
    #: withdrawn by the A/B test: run stock from now on
    withdrawn: bool = False
    holdout: list[float] = field(default_factory=list)
    samples: dict[str, list[float]] = field(default_factory=dict)
    fingerprint: str | None = None
    decisions: int = 0
    #: the plans of its arms were compared (arms with the plan of another were retired)
    plans_checked: bool = False
    #: arm -> the cost model's predicted log latency minus stock's (warm start; see above)
    predicted: dict[str, float] = field(default_factory=dict)
    #: the sd of the model's log-latency error: how much a prediction weighs
    prior_sd: float = 0.5

    @property
    def prior(self) -> dict[str, float]:
        """arm -> offset of its posterior's mean from stock's: the predictions that bring it
        forward (those of a faster plan)."""
        return {arm: r for arm, r in self.predicted.items() if r < 0}

    def live(self, disabled: Iterable[str] = ()) -> list[str]:
        off = set(disabled)
        return [a for a in ARMS if a not in self.retired and a not in off]


@dataclass
class Policy:
    """The decision rule; parameters only (scikit-learn style), state lives in TemplateState."""

    regression: float = 0.10
    t_retire: float = 2.0
    confidence: float = 0.95
    min_pulls: int = 3
    #: an arm not likely to beat stock by this share is dropped after `quick_pulls` tries:
    #: the stock planner is usually right, so exploration should cost little
    min_gain: float = 0.10
    quick_pulls: int = 2
    draws: int = 200
    max_samples: int = 200
    #: a predicted ratio to stock beyond this factor (either way) counts as this factor
    prior_clip: float = 4.0

    def choose(self, st: TemplateState, rng: random.Random, disabled: Sequence[str] = ()) -> str:
        if st.withdrawn:
            return STOCK
        if st.converged is not None and st.converged not in disabled:
            return st.converged
        live = st.live(disabled)
        if STOCK not in live:
            live.append(STOCK)
        stock = st.arms[STOCK]
        prior_mean = stock.mean if stock.n else 0.0
        prior_var = stock.var if stock.n > 1 and math.isfinite(stock.var) else 1.0
        prior_var = max(prior_var, 0.05)
        best, best_mu = STOCK, math.inf
        for arm in live:
            mu = self._draw(st, arm, rng, prior_mean, prior_var)
            if mu < best_mu:
                best, best_mu = arm, mu
        return best

    def update(self, st: TemplateState, arm: str, ms: float, rng: random.Random) -> str | None:
        """Record one execution; returns what changed ("retired:<arm>", "converged:<arm>")."""
        log_ms = math.log(max(ms, 1e-3))
        st.arms[arm].add(log_ms)
        samples = st.samples.setdefault(arm, [])
        samples.append(ms)
        if len(samples) > self.max_samples:
            del samples[0]
        if arm == STOCK:
            return None
        stock = st.arms[STOCK]
        a = st.arms[arm]
        if stock.n >= self.min_pulls and a.n >= self.quick_pulls:
            t = welch_t(a, stock)
            slower = a.mean - stock.mean > math.log1p(self.regression) and t > self.t_retire
            se = math.sqrt(a.var / a.n + stock.var / stock.n) if a.n > 1 else math.inf
            no_gain = (stock.mean - a.mean) + se < math.log1p(self.min_gain)
            if slower or no_gain:
                st.retired.add(arm)
                if st.converged == arm:
                    st.converged = None
                if all(x in st.retired for x in ARMS if x != STOCK):
                    st.converged = STOCK  # nothing beats the stock plan: stop exploring
                return f"retired:{arm}"
        if st.converged is None and a.n >= self.min_pulls:
            leader = self._leader(st, rng)
            if leader is not None:
                st.converged = leader
                if leader != STOCK:
                    # the A/B trial starts now: arm and holdout samples of the same period
                    st.samples[leader] = []
                    st.holdout.clear()
                return f"converged:{leader}"
        return None

    def same_plans(self, st: TemplateState, shapes: dict[str, Hashable]) -> list[str]:
        """Retire the arms whose plan (its shape, from EXPLAIN under the arm's switches) is
        stock's or an earlier arm's: trying them would measure the same plan again. Returns
        the arms retired. Bao compares the plans of its hint sets the same way."""
        seen = {shapes[STOCK]} if STOCK in shapes else set()
        out = []
        for arm in ARMS:
            if arm == STOCK or arm not in shapes:
                continue
            if shapes[arm] in seen and arm not in st.retired:
                st.retired.add(arm)
                out.append(arm)
                if st.converged == arm:  # converged on a plan it already had: nothing to try
                    st.converged = None
            seen.add(shapes[arm])
        if out and st.converged is None and all(a in st.retired for a in ARMS if a != STOCK):
            st.converged = STOCK  # no switch changes its plan: nothing to explore
        return out

    def warm_start(
        self, st: TemplateState, predicted_ms: dict[str, float], error_sd: float = 0.5
    ) -> dict[str, float]:
        """Take the cost model's predictions (ms per arm, stock included: only the ratios are
        used, the level is the template's own observed mean) and its error's sd in log
        latency. Returns the offsets that bring arms forward (those predicted faster)."""
        base = predicted_ms.get(STOCK)
        if base is None or not base > 0 or not math.isfinite(base):
            return {}
        clip = math.log(self.prior_clip)
        st.predicted = {
            arm: max(-clip, min(clip, math.log(ms / base)))
            for arm, ms in predicted_ms.items()
            if arm != STOCK and arm not in st.retired and ms > 0 and math.isfinite(ms)
        }
        st.prior_sd = max(error_sd, 0.05)
        return st.prior

    @staticmethod
    def _kappa(st: TemplateState, prior_var: float) -> float:
        """The weight of a prediction in observations: the posterior's mean has the spread of
        one execution divided by kappa, so kappa makes it the model's error."""
        return min(1.0, max(0.05, prior_var / st.prior_sd**2))

    def _draw(self, st: TemplateState, arm: str, rng: random.Random, base: float,
              prior_var: float) -> float:  # fmt: skip
        """One posterior draw of `arm`'s log expected latency; its prior is stock's `base`,
        moved and weighted by the cost model when it predicted the arm's plan faster."""
        offset = st.predicted.get(arm, 0.0)
        if offset >= 0:
            return st.arms[arm].sample_mean(rng, base, prior_var)
        return st.arms[arm].sample_mean(rng, base + offset, prior_var, self._kappa(st, prior_var))

    def _leader(self, st: TemplateState, rng: random.Random) -> str | None:
        live = [a for a in st.live() if st.arms[a].n >= self.min_pulls]
        if len(live) < 2:
            return None
        stock = st.arms[STOCK]
        prior_var = max(stock.var if math.isfinite(stock.var) else 1.0, 0.05)
        wins = dict.fromkeys(live, 0)
        head_start = math.log1p(self.min_gain)
        for _ in range(self.draws):
            draws = {a: self._draw(st, a, rng, stock.mean, prior_var) for a in live}
            if STOCK in draws:
                draws[STOCK] -= head_start
            wins[min(draws, key=draws.__getitem__)] += 1
        best = max(wins, key=wins.__getitem__)
        return best if wins[best] >= self.confidence * self.draws else None


def welch_t(a: ArmStats, b: ArmStats) -> float:
    """Welch's t of a.mean - b.mean (positive: a is slower)."""
    if a.n < 2 or b.n < 2:
        return 0.0
    se = math.sqrt(a.var / a.n + b.var / b.n)
    return (a.mean - b.mean) / se if se > 0 else math.copysign(math.inf, a.mean - b.mean)


def mann_whitney(treated: Sequence[float], control: Sequence[float]) -> tuple[float, float]:
    """One-sided Mann-Whitney U (treated faster than control): (p-value, median ratio)."""
    from scipy.stats import mannwhitneyu

    result = mannwhitneyu(treated, control, alternative="less")
    ratio = _median(treated) / max(_median(control), 1e-9)
    return float(result.pvalue), ratio


#: an A/B trial is settled before its full sample when p is below this share of alpha
EARLY_ALPHA = 0.05


def mean_ratio(treated: Sequence[float], control: Sequence[float]) -> float:
    """Mean latency of the treated executions over the control's: the A/B test's second
    condition (Mann-Whitney U speaks of medians; users pay the total)."""
    return (sum(treated) / len(treated)) / max(sum(control) / len(control), 1e-9)


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


#: what makes two plans the same plan (not their estimates)
_SHAPE_KEYS = ("Node Type", "Join Type", "Strategy", "Relation Name", "Index Name",
               "Scan Direction", "Parent Relationship", "Sort Key", "Hash Cond", "Merge Cond",
               "Join Filter", "Index Cond", "Filter")  # fmt: skip


def plan_shape(explain_output: Any) -> Hashable:
    """The shape of an EXPLAIN (FORMAT JSON) plan: node types, relations, indexes and
    conditions, children in order; costs and row estimates left out."""
    doc = json.loads(explain_output) if isinstance(explain_output, str | bytes) else explain_output
    if isinstance(doc, list):
        doc = doc[0]

    def shape(node: dict[str, Any]) -> tuple[Any, ...]:
        own = tuple(str(node.get(k)) for k in _SHAPE_KEYS)
        return own + tuple(shape(child) for child in node.get("Plans", ()))

    return shape(doc["Plan"])
