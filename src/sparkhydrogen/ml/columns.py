"""The DataFrame a gang trains on: features as one ``array<float>``, the label, the validation flag.

The estimators never collect the training data: they select these columns (a projection,
no shuffle, so each rank's share keeps the DataFrame's partitions and their order) and hand
the result to the launcher's ``data=``. The ranks read the fixed names below.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["FEATURES", "LABEL", "VALID", "feature_expression", "label_expression", "training_frame"]

log = logging.getLogger("sparkhydrogen.ml")

#: the columns a rank reads (``sparkhydrogen.torch.data_loader(columns=[FEATURES, LABEL, VALID])``)
FEATURES, LABEL, VALID = "h2_features", "h2_label", "h2_valid"


def _columns(dataset: Any) -> dict[str, Any]:
    return {field.name: field.dataType for field in dataset.schema.fields}


def _missing(name: str, known: dict[str, Any], what: str) -> ValueError:
    return ValueError(f"{what} {name!r} is not a column of the DataFrame; its columns are {sorted(known)}")


def feature_expression(dataset: Any, features_col: str | list[str]) -> Any:
    """One ``array<float>`` column from a vector column, or from numeric/array columns concatenated in order.

    Vectors go through ``pyspark.ml.functions.vector_to_array`` (dense or sparse alike).
    """
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, NumericType

    known = _columns(dataset)
    names = [features_col] if isinstance(features_col, str) else list(features_col)
    parts = []
    for name in names:
        if name not in known:
            raise _missing(name, known, "features_col")
        kind = known[name]
        if isinstance(kind, VectorUDT) or getattr(kind, "typeName", lambda: "")() == "vector":
            parts.append(vector_to_array(F.col(name), "float32"))
        elif isinstance(kind, ArrayType) and isinstance(kind.elementType, NumericType):
            parts.append(F.col(name).cast("array<float>"))
        elif isinstance(kind, NumericType):
            parts.append(F.array(F.col(name).cast("float")))
        else:
            raise TypeError(f"features_col {name!r} has type {kind.simpleString()}: use a vector column "
                            "(VectorAssembler), numeric columns, or arrays of numbers")
    return parts[0] if len(parts) == 1 else F.concat(*parts)


def label_expression(dataset: Any, label_col: str) -> Any:
    """The label as ``double`` (a class index or a target), or ``array<double>`` for several targets."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, BooleanType, NumericType

    known = _columns(dataset)
    if label_col not in known:
        raise _missing(label_col, known, "label_col")
    kind = known[label_col]
    if isinstance(kind, (NumericType, BooleanType)):
        return F.col(label_col).cast("double")
    if isinstance(kind, ArrayType) and isinstance(kind.elementType, NumericType):
        return F.col(label_col).cast("array<double>")
    if isinstance(kind, VectorUDT):
        return vector_to_array(F.col(label_col))
    raise TypeError(f"label_col {label_col!r} has type {kind.simpleString()}: use a number or an array of numbers")


def training_frame(dataset: Any, features_col: str | list[str], label_col: str | None, *,
                   validation_col: str | None = None, validation_fraction: float = 0.0, seed: int = 0) -> Any:
    """``dataset`` projected to ``FEATURES``, ``LABEL`` (when given) and ``VALID`` (when validating).

    ``validation_col`` (a boolean column) wins over ``validation_fraction`` (``rand(seed) < f``).
    A projection only: no rows move, nothing is collected.
    """
    from pyspark.sql import functions as F

    selected = [feature_expression(dataset, features_col).alias(FEATURES)]
    if label_col is not None:
        selected.append(label_expression(dataset, label_col).alias(LABEL))
    if validation_col is not None:
        known = _columns(dataset)
        if validation_col not in known:
            raise _missing(validation_col, known, "validation_col")
        selected.append(F.coalesce(F.col(validation_col).cast("boolean"), F.lit(False)).alias(VALID))
    elif validation_fraction > 0:
        selected.append((F.rand(seed) < F.lit(validation_fraction)).alias(VALID))
    return dataset.select(*selected)

