"""``run(fn, n, data=df)``: the gang's data, split into one share per rank without passing through the driver.

Every row goes to exactly one rank, and each rank streams its share as its task's
input (bounded memory, as any Spark task reads its partitions):

* Classic Spark, a DataFrame or RDD with at least ``n`` partitions: its partitions are
  grouped into ``n`` shares without a shuffle (``coalesce(n)``, so shares are balanced
  within one partition), and the gang runs as a coordinated stage over them (Spark
  refuses ``coalesce`` inside a barrier stage; the coordinator's start gate gives the
  all-or-nothing start instead). With exactly ``n`` partitions each rank reads one.
* Fewer partitions than ranks, a DataFrame whose plan has a shuffle (adaptive query
  execution may merge its partitions at run time), or Spark Connect (whose gangs are
  barrier stages): a round-robin ``repartition(n)``, rows balanced to one.

How the shares reach the ranks (classic Spark): as Arrow record-batch messages made in
the JVM (``Dataset.toArrowBatchRdd``, what ``toPandas`` builds on) in an RDD, decoded in
the rank against the schema sent with the stage. The gang stage is then an RDD stage like
every gang without ``data=``, so it runs in the same Python workers: a ``mapInArrow``
stage runs in a second set that Spark keys apart (its SQL runner adds
``SPARK_SIMPLIFIED_TRACEBACK`` to the workers' environment), whose start made a
session's first ``data=`` call seconds slower than the next. Column types whose Arrow
form depends on session settings (timestamps, decimals, maps, large string types) and
Spark Connect keep ``mapInArrow``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .session import SparkTarget, is_connect

__all__ = ["GangData", "as_messages", "fixed_arrow_type", "gang_data", "share_plan", "session_of", "planned_partitions"]

log = logging.getLogger("sparkhydrogen.launch")


@dataclass(frozen=True)
class GangData:
    """The gang's input: a DataFrame (``arrow``: its ranks read Arrow batches) or an RDD, already cut into shares."""

    source: Any
    arrow: bool
    how: str  # how the shares were made, for the driver log: "as is", "coalesce(5 -> 2)", "repartition(2)"
    #: set: ``source`` is an RDD of Arrow record-batch messages (IPC) of this serialized Arrow schema
    arrow_schema: bytes | None = None


def share_plan(partitions: int | None, ranks: int, shuffled: bool, barrier: bool) -> str:
    """How ``partitions`` become ``ranks`` shares: ``"as is"``, ``"coalesce"`` or ``"repartition"`` (pure).

    >>> share_plan(5, 2, False, False), share_plan(2, 2, False, True), share_plan(1, 2, False, False)
    ('coalesce', 'as is', 'repartition')
    >>> share_plan(8, 2, True, False), share_plan(8, 2, False, True), share_plan(None, 2, False, True)
    ('repartition', 'repartition', 'repartition')
    """
    if partitions is None or partitions < ranks:
        return "repartition"
    if partitions == ranks and not shuffled:
        return "as is"
    if barrier or shuffled:
        return "repartition"
    return "coalesce"


def _is_rdd(value: Any) -> bool:
    return type(value).__name__ in ("RDD", "PipelinedRDD") and type(value).__module__.startswith("pyspark")


def _is_dataframe(value: Any) -> bool:
    return type(value).__name__ == "DataFrame" and type(value).__module__.startswith("pyspark.sql")


def _has_shuffle(df: Any, limit: int = 500) -> bool:
    """Whether the physical plan shuffles (outside cached data, whose partitions are fixed), without running it."""
    try:
        stack = [df._jdf.queryExecution().executedPlan()]
        seen = 0
        while stack:
            node = stack.pop()
            seen += 1
            kind = str(node.getClass().getSimpleName())
            if "Exchange" in kind and "Reused" not in kind or seen > limit:
                return True
            if kind == "AdaptiveSparkPlanExec":
                stack.append(node.inputPlan())
                continue
            children = node.children()
            stack.extend(children.apply(i) for i in range(children.size()))
        return False
    except Exception:  # cannot tell: assume it has (repartition is always correct)
        return True


def session_of(data: Any, spark: Any = None) -> Any:
    """What a gang on ``data`` runs on: ``spark`` if given, else the data's own session (``None``: the active one).

    A Spark Connect DataFrame must run on its Connect session even where a classic
    SparkContext is active in the same process (a local Connect server).
    """
    if spark is not None or data is None:
        return spark
    if _is_dataframe(data):
        return data.sparkSession
    if _is_rdd(data):
        return data.context
    return None


def gang_data(value: Any, target: SparkTarget, ranks: int) -> GangData | None:
    """Validate ``data=`` for a gang of ``ranks`` on ``target`` and cut it into one share per rank."""
    if value is None:
        return None
    if _is_dataframe(value):
        if is_connect(value) != target.connect:
            raise ValueError("data= is a " + ("Spark Connect" if is_connect(value) else "classic") + " DataFrame but "
                             "the gang runs on a " + ("Spark Connect" if target.connect else "classic") +
                             " session: pass a DataFrame of the session the gang runs on")
        if target.connect:
            partitions = planned_partitions(value)
            plan = share_plan(partitions, ranks, False, barrier=True)
        else:
            shuffled = _has_shuffle(value)  # read before planning partitions: that would run the shuffle
            partitions = None if shuffled else int(value.rdd.getNumPartitions())
            plan = share_plan(partitions, ranks, shuffled, barrier=False)
        shares = _cut(value, plan, partitions, ranks, arrow=True)
        return shares if target.connect else as_messages(shares)
    if _is_rdd(value):
        if target.connect:
            raise TypeError("data= is an RDD, but Spark Connect has no RDDs: pass a DataFrame")
        if value.context is not target.sc:
            raise ValueError("data= is an RDD of another SparkContext than the one the gang runs on")
        partitions = int(value.getNumPartitions())
        return _cut(value, share_plan(partitions, ranks, False, barrier=False), partitions, ranks, arrow=False)
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    raise TypeError(f"data= must be a pyspark DataFrame or RDD, got {kind}")


def _cut(source: Any, plan: str, partitions: int | None, ranks: int, *, arrow: bool) -> GangData:
    known = "?" if partitions is None else str(partitions)
    if plan == "as is":
        return GangData(source, arrow, f"{known} partitions, one per rank")
    if plan == "coalesce":
        return GangData(source.coalesce(ranks), arrow, f"coalesce({known} partitions -> {ranks} shares)")
    return GangData(source.repartition(ranks), arrow, f"repartition({known} partitions -> {ranks} shares)")


def as_messages(shares: GangData) -> GangData:
    """``shares`` (a classic DataFrame's) as an RDD of Arrow record-batch messages, or as they are when unsafe.

    Safe: every column's Arrow type is fixed by its Spark type alone (see :func:`fixed_arrow_type`)
    and the JVM can make the messages; then the rank decodes them against the schema made here.
    """
    df = shares.source
    try:
        if not all(fixed_arrow_type(field.dataType) for field in df.schema.fields):
            return shares
        if str(df.sparkSession.conf.get("spark.sql.execution.arrow.useLargeVarTypes", "false")).lower() == "true":
            return shares
        from pyspark import RDD
        from pyspark.serializers import NoOpSerializer
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = to_arrow_schema(df.schema)
        messages: Any = RDD(df._jdf.toArrowBatchRdd().toJavaRDD(), df.sparkSession.sparkContext, NoOpSerializer())
    except Exception as exc:  # an older or newer Spark without the JVM method: the mapInArrow stage
        log.debug("data=: Arrow messages unavailable (%s); the gang reads the DataFrame through mapInArrow", exc)
        return shares
    return GangData(messages, True, shares.how, bytes(schema.serialize().to_pybytes()))


#: Spark types whose Arrow form (``to_arrow_schema``) is the one the JVM writes whatever the session's settings.
_FIXED = {"ByteType", "ShortType", "IntegerType", "LongType", "FloatType", "DoubleType", "BooleanType",
          "StringType", "BinaryType", "DateType", "NullType"}


def fixed_arrow_type(kind: Any) -> bool:
    """Whether a Spark type's Arrow type is fixed: numbers, booleans, strings, binary, dates; arrays, structs of them.

    >>> from pyspark.sql.types import ArrayType, FloatType, TimestampType
    >>> fixed_arrow_type(ArrayType(FloatType())), fixed_arrow_type(TimestampType())
    (True, False)
    """
    name = type(kind).__name__
    if name == "ArrayType":
        return fixed_arrow_type(kind.elementType)
    if name == "StructType":
        return all(fixed_arrow_type(field.dataType) for field in kind.fields)
    return name in _FIXED


#: Connect plan nodes that keep their child's partitioning (walked through to find the partition count).
_NARROW = {"Project", "Filter", "WithColumns", "WithColumnsRenamed", "Drop", "ToDF", "SubqueryAlias", "Hint",
           "Sample", "WithWatermark"}


def planned_partitions(df: Any) -> int | None:
    """Partitions a Spark Connect DataFrame's plan states (``repartition(n)``, ``range(..., numPartitions)``).

    ``None`` when the plan does not say (the size is then the stage's task count, read in the tasks).
    """
    node = getattr(df, "_plan", None)
    while node is not None:
        kind = type(node).__name__
        if kind in ("Repartition", "Range"):
            count = getattr(node, "_num_partitions", None)
            return count if isinstance(count, int) and count > 0 else None
        if kind == "RepartitionByExpression":
            count = getattr(node, "num_partitions", None)
            return count if isinstance(count, int) and count > 0 else None
        if kind not in _NARROW:
            return None
        node = getattr(node, "_child", None)
    return None
