"""Point-in-time training, validation and test sets (the Fraud Detection Handbook's protocol).

Timeline, with T = `train_start` and the defaults train = delay = test = 7 days:

    [T, T+7)      training week: the final model is fitted on it
    [T+7, T+14)   delay (gap): labels not yet known when the model is trained; no set uses it
    [T+14, T+21)  test week: scored once, never used for any choice

Model selection is prequential (Handbook chapter 5): validation fold i (i = 0 .. n-1) is the same
train / gap / assessment block moved back so that its assessment week ends where the training
week ends, then i more weeks back:

    fold i: train [T - d - a - i*a, T - a - i*a), gap d, assess [T - i*a, T - i*a + a)

(d = delay_days, a = test_days.) Fold 0 assesses on the training week itself, with a model trained
two weeks earlier: every label a fold uses is known at T + train_days, and no fold touches the gap
or the test week.

Assessment and test sets follow the Handbook's `get_train_test_set`: a card already known to be
compromised is removed, i.e. on assessment day j, cards with a fraud in the training window or in
the days up to (assessment start - delay + j - 1) — the labels known by then — are dropped.

Features come from the Feast offline store through a point-in-time join
(`fraud.feature_store.historical_features`), so training sees exactly what serving sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import pandas as pd

from fraud.errors import UserError
from fraud.features.definitions import LABEL_DELAY_DAYS, MODEL_FEATURES
from fraud.schema import CUSTOMER_ID, TERMINAL_ID, TRANSACTION_ID, TX_AMOUNT, TX_DATETIME, TX_FRAUD
from fraud.training.sampling import SAMPLE_WEIGHT, downsample_legit

#: Columns every set carries besides the model features.
ID_COLUMNS: tuple[str, ...] = (TRANSACTION_ID, CUSTOMER_ID, TERMINAL_ID, TX_DATETIME, TX_AMOUNT, TX_FRAUD)
SET_COLUMNS: tuple[str, ...] = (*ID_COLUMNS, *MODEL_FEATURES)

FeatureLookup = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass(frozen=True)
class Window:
    """A half-open time window [start, end) of whole days."""

    start: datetime
    end: datetime

    def contains(self, timestamps: pd.Series) -> pd.Series:
        return (timestamps >= self.start) & (timestamps < self.end)

    def as_dict(self) -> dict[str, str]:
        return {"start": self.start.date().isoformat(), "end": self.end.date().isoformat()}

    @property
    def days(self) -> int:
        return (self.end - self.start).days


@dataclass(frozen=True)
class Block:
    """One train / delay / assessment block."""

    train: Window
    delay: Window
    assess: Window


def _as_datetime(value: date | datetime | str) -> datetime:
    if isinstance(value, str):
        try:
            value = date.fromisoformat(value.strip()[:10])
        except ValueError:
            raise UserError(f"train_start {value!r} is not a date (YYYY-MM-DD)") from None
    if isinstance(value, datetime):
        return datetime(value.year, value.month, value.day)
    return datetime(value.year, value.month, value.day)


@dataclass(frozen=True)
class SplitPlan:
    """The windows of one training run (parameters, not constants)."""

    train_start: datetime
    train_days: int = 7
    delay_days: int = LABEL_DELAY_DAYS
    test_days: int = 7
    n_validation_folds: int = 3

    @classmethod
    def create(
        cls,
        train_start: date | datetime | str,
        train_days: int = 7,
        delay_days: int = LABEL_DELAY_DAYS,
        test_days: int = 7,
        n_validation_folds: int = 3,
    ) -> SplitPlan:
        for name, value, minimum in (
            ("train_days", train_days, 1),
            ("delay_days", delay_days, 0),
            ("test_days", test_days, 1),
            ("n_validation_folds", n_validation_folds, 1),
        ):
            if int(value) < minimum:
                raise UserError(f"{name} must be >= {minimum}, got {value}")
        return cls(_as_datetime(train_start), int(train_days), int(delay_days), int(test_days), int(n_validation_folds))

    def _block(self, train_start: datetime) -> Block:
        train_end = train_start + timedelta(days=self.train_days)
        delay_end = train_end + timedelta(days=self.delay_days)
        return Block(
            train=Window(train_start, train_end),
            delay=Window(train_end, delay_end),
            assess=Window(delay_end, delay_end + timedelta(days=self.test_days)),
        )

    @property
    def final(self) -> Block:
        """The block of the final model: its assessment window is the test window."""
        return self._block(self.train_start)

    def fold(self, index: int) -> Block:
        """Validation fold `index` (0-based); its assessment ends at or before the training end."""
        shift = self.delay_days + self.test_days + index * self.test_days
        return self._block(self.train_start - timedelta(days=shift))

    @property
    def folds(self) -> list[Block]:
        return [self.fold(i) for i in range(self.n_validation_folds)]

    @property
    def span(self) -> Window:
        """Every day any set needs (labels included)."""
        earliest = self.fold(self.n_validation_folds - 1).train.start
        return Window(earliest, self.final.assess.end)

    def describe(self) -> dict:
        return {
            "train": self.final.train.as_dict(),
            "delay": self.final.delay.as_dict(),
            "test": self.final.assess.as_dict(),
            "folds": [{"train": b.train.as_dict(), "validation": b.assess.as_dict()} for b in self.folds],
            "train_days": self.train_days,
            "delay_days": self.delay_days,
            "test_days": self.test_days,
            "n_validation_folds": self.n_validation_folds,
        }


def assessment_rows(labelled: pd.DataFrame, block: Block) -> pd.Series:
    """Mask of the rows of `block.assess` that remain after removing cards known to be compromised
    (the Handbook's `get_train_test_set`): for assessment day j, the cards with a fraud in the
    training window or on days train_end .. train_end + j - 1."""
    when = labelled[TX_DATETIME]
    frauds = labelled[labelled[TX_FRAUD] == 1]
    known = set(frauds.loc[block.train.contains(frauds[TX_DATETIME]), CUSTOMER_ID])
    keep = pd.Series(False, index=labelled.index)
    for day in range(block.assess.days):
        day_start = block.assess.start + timedelta(days=day)
        newly_known_day = Window(block.train.end + timedelta(days=day - 1), block.train.end + timedelta(days=day))
        known |= set(frauds.loc[newly_known_day.contains(frauds[TX_DATETIME]), CUSTOMER_ID])
        in_day = Window(day_start, day_start + timedelta(days=1)).contains(when)
        keep |= in_day & ~labelled[CUSTOMER_ID].isin(known)
    return keep


@dataclass
class TrainingSets:
    """Everything model selection, training and evaluation need."""

    plan: SplitPlan
    train: pd.DataFrame
    test: pd.DataFrame
    folds: list[tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=list)

    def summary(self) -> dict:
        def count(frame: pd.DataFrame) -> dict[str, int]:
            return {"rows": len(frame), "frauds": int(frame[TX_FRAUD].sum()) if len(frame) else 0}

        return {
            "windows": self.plan.describe(),
            "train": count(self.train),
            "test": count(self.test),
            "folds": [{"train": count(t), "validation": count(v)} for t, v in self.folds],
        }

    def save(self, train_path: Path, folds_dir: Path, test_path: Path) -> None:
        """Write the training window, the validation folds (a directory, with the plan) and the test
        window — three separate artifacts, so a consumer can be given the test set or not."""
        folds_dir = Path(folds_dir)
        folds_dir.mkdir(parents=True, exist_ok=True)
        for path in (Path(train_path), Path(test_path)):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.train.to_parquet(train_path, index=False)
        self.test.to_parquet(test_path, index=False)
        for i, (fold_train, fold_valid) in enumerate(self.folds):
            fold_train.to_parquet(folds_dir / f"fold-{i}-train.parquet", index=False)
            fold_valid.to_parquet(folds_dir / f"fold-{i}-validation.parquet", index=False)
        (folds_dir / PLAN_FILE).write_text(json.dumps(asdict(self.plan), default=str, indent=2))

    @classmethod
    def load(cls, train_path: Path, folds_dir: Path, test_path: Path | None = None) -> TrainingSets:
        """Read what `save` wrote; without `test_path` the test frame is empty (training never sees it)."""
        folds_dir = Path(folds_dir)
        plan = load_plan(folds_dir)
        folds = [
            (
                pd.read_parquet(folds_dir / f"fold-{i}-train.parquet"),
                pd.read_parquet(folds_dir / f"fold-{i}-validation.parquet"),
            )
            for i in range(plan.n_validation_folds)
        ]
        train = pd.read_parquet(train_path)
        test = pd.read_parquet(test_path) if test_path is not None else train.iloc[0:0].copy()
        return cls(plan, train, test, folds)


PLAN_FILE = "plan.json"


def load_plan(folds_dir: Path) -> SplitPlan:
    raw = json.loads((Path(folds_dir) / PLAN_FILE).read_text())
    return SplitPlan.create(
        raw["train_start"], raw["train_days"], raw["delay_days"], raw["test_days"], raw["n_validation_folds"]
    )


def split_featured(featured: pd.DataFrame, plan: SplitPlan) -> TrainingSets:
    """Cut one frame of labelled, featured transactions (SET_COLUMNS, covering `plan.span`) into sets."""
    missing = [c for c in SET_COLUMNS if c not in featured.columns]
    if missing:
        raise UserError(f"featured transactions lack column(s) {', '.join(missing)}")
    frame = featured.sort_values([TX_DATETIME, TRANSACTION_ID], kind="mergesort").reset_index(drop=True)

    columns = [*SET_COLUMNS, *([SAMPLE_WEIGHT] if SAMPLE_WEIGHT in frame.columns else [])]

    def select(mask: pd.Series) -> pd.DataFrame:
        return frame.loc[mask, columns].reset_index(drop=True)

    def block_sets(block: Block) -> tuple[pd.DataFrame, pd.DataFrame]:
        return select(block.train.contains(frame[TX_DATETIME])), select(assessment_rows(frame, block))

    train, test = block_sets(plan.final)
    folds = [block_sets(block) for block in plan.folds]
    sets = TrainingSets(plan=plan, train=train, test=test, folds=folds)
    _check_not_empty(sets)
    return sets


def _check_not_empty(sets: TrainingSets) -> None:
    windows = sets.plan.describe()
    if sets.train.empty or sets.train[TX_FRAUD].sum() == 0:
        raise UserError(f"the training window {windows['train']} has no transactions or no fraud")
    for i, (fold_train, fold_valid) in enumerate(sets.folds):
        if fold_train.empty or fold_train[TX_FRAUD].sum() == 0 or fold_valid.empty:
            raise UserError(
                f"validation fold {i} {windows['folds'][i]} has no data or no fraud: the data must start "
                f"by {sets.plan.span.start.date()} (or use fewer folds / a later train_start)"
            )
    if sets.test.empty:
        raise UserError(f"the test window {windows['test']} has no transactions")


def _needed_rows(labelled: pd.DataFrame, plan: SplitPlan) -> pd.Series:
    """Rows that are in some train or assessment window (the gap rows only provide labels)."""
    when = labelled[TX_DATETIME]
    mask = pd.Series(False, index=labelled.index)
    for block in (plan.final, *plan.folds):
        mask |= block.train.contains(when) | block.assess.contains(when)
    return mask


def build_training_sets(
    plan: SplitPlan,
    labelled: pd.DataFrame | None = None,
    feature_lookup: FeatureLookup | None = None,
    legit_per_day: int | None = None,
    seed: int = 0,
) -> TrainingSets:
    """Labelled transactions of `plan.span` (read from the current data layout unless given) joined
    point-in-time with their features, cut into train / validation folds / test.

    With `legit_per_day`, every training frame (the training week and each fold's) keeps at most
    that many legitimate transactions per day, weighted back (`fraud.training.sampling`); the days
    that no assessment window uses are sampled before the feature join, so the join shrinks too.
    Assessment and test frames are whole. The frames carry a `sample_weight` column that `fit` uses."""
    if labelled is None:
        from fraud.features.offline import labelled_transactions

        labelled = labelled_transactions(plan.span.start, plan.span.end)
    if labelled.empty:
        raise UserError(f"no transactions between {plan.span.start.date()} and {plan.span.end.date()}")
    if feature_lookup is None:
        from fraud.feature_store import historical_features

        feature_lookup = historical_features
    needed = labelled.loc[_needed_rows(labelled, plan)].reset_index(drop=True)
    if legit_per_day:
        assessed = pd.Series(False, index=needed.index)
        for block in (plan.final, *plan.folds):
            assessed |= block.assess.contains(needed[TX_DATETIME])
        needed = downsample_legit(needed, legit_per_day, seed, protect=assessed).reset_index(drop=True)
    features = feature_lookup(needed)
    features = _align_features(needed, features)
    carried = [*ID_COLUMNS, *([SAMPLE_WEIGHT] if SAMPLE_WEIGHT in needed.columns else [])]
    featured = pd.concat([needed[carried].reset_index(drop=True), features], axis=1)
    # the gap rows carry labels only: the known-compromised rule reads them
    gap_rows = labelled.loc[~_needed_rows(labelled, plan), list(ID_COLUMNS)]
    gap_rows = gap_rows.assign(**{name: float("nan") for name in MODEL_FEATURES})
    everything = pd.concat([featured, gap_rows], ignore_index=True)
    sets = split_featured(everything, plan)
    if legit_per_day:
        # days that assessment windows needed whole are sampled in the training frames only
        def sample(frame: pd.DataFrame) -> pd.DataFrame:
            return downsample_legit(frame, legit_per_day, seed).reset_index(drop=True)

        sets = TrainingSets(
            plan=sets.plan,
            train=sample(sets.train),
            test=sets.test,
            folds=[(sample(fold_train), fold_valid) for fold_train, fold_valid in sets.folds],
        )
    return sets


def _align_features(entity: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """The lookup result as MODEL_FEATURES columns in the entity frame's row order."""
    missing = [c for c in MODEL_FEATURES if c not in features.columns]
    if missing:
        raise UserError(f"the feature store returned no column(s) {', '.join(missing)}")
    if len(features) != len(entity):
        raise UserError(f"the feature store returned {len(features)} rows for {len(entity)} transactions")
    if TRANSACTION_ID in features.columns:
        features = features.set_index(TRANSACTION_ID).reindex(entity[TRANSACTION_ID]).reset_index(drop=True)
        if features[list(MODEL_FEATURES)].isna().all(axis=1).any():
            raise UserError("the feature store returned rows for unknown transaction ids")
    else:
        features = features.reset_index(drop=True)
    return features[list(MODEL_FEATURES)].astype("float64")
