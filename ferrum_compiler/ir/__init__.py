"""ferrum's small IR: graph + builder, printer/serialiser, numpy reference interpreter."""

from .graph import OP_KINDS, Graph, GraphBuilder, IRError, Op, Value, static
from .text import graph_from_json, graph_to_json, op_histogram, print_graph

__all__ = ["OP_KINDS", "Graph", "GraphBuilder", "IRError", "Op", "Value", "graph_from_json", "graph_to_json",
           "op_histogram", "print_graph", "static"]
