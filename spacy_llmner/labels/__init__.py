from .scheme import LabelSet

__all__ = ["LabelSet"]
