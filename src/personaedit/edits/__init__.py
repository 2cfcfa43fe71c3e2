"""Edits as values: context, activation and weight edits, their composition, saving and loading."""

from personaedit.edits.activation import ActivationEdit, Intervention
from personaedit.edits.base import BaseModelInfo, ComposedEdit, Description, Edit, load_edit
from personaedit.edits.context import ContextEdit
from personaedit.edits.routed import RoutedEdit
from personaedit.edits.weight import Delta, WeightEdit

EDIT_KINDS: dict[str, type[Edit]] = {
    cls.kind: cls for cls in (ContextEdit, ActivationEdit, WeightEdit, ComposedEdit, RoutedEdit)
}

__all__ = [
    "ActivationEdit", "BaseModelInfo", "ComposedEdit", "ContextEdit", "Delta", "Description", "EDIT_KINDS", "Edit",
    "Intervention", "RoutedEdit", "WeightEdit", "load_edit",
]
