"""hhh's applications as LangChain components (`pip install 'hhh[langchain]'`, i.e. langchain-core):

    HHHRetriever(index=Index.load("rag-index"), k=4)   a BaseRetriever: Documents with source, section, score
    sandbox_tool()                                      the PAL sandbox as a tool: code in, answer and output back
    as_langchain_tool(tool)                             any hhh tool (calculator, search, your functions)

>>> from hhh.apps.rag import Index
>>> docs = HHHRetriever(index=Index.load("rag-index")).invoke("How does hhh resume a PPO run?")   # doctest: +SKIP
>>> sandbox_tool().invoke({"code": "answer = 6 * 7"})                                             # doctest: +SKIP
'answer = 42'
"""

from __future__ import annotations

from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
    from langchain_core.tools import BaseTool, StructuredTool, ToolException
except ImportError as e:  # the optional extra is not installed
    raise ImportError("hhh.apps.langchain needs langchain-core: pip install 'hhh[langchain]'") from e
from pydantic import ConfigDict

from hhh.apps.tools import Tool, ToolError, python


class HHHRetriever(BaseRetriever):
    """Top-k chunks of an hhh RAG index (hhh.apps.rag.Index) as LangChain Documents; metadata holds the file,
    section, first line, citation, similarity and rank. Chunks below `min_score` are left out."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: Any
    k: int = 4
    mmr: bool = False
    min_score: float | None = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        hits = self.index.search(query, k=self.k, mmr=self.mmr)
        return [Document(page_content=h.chunk.text,
                         metadata={"source": h.chunk.source, "section": h.chunk.section, "line": h.chunk.line,
                                   "citation": h.chunk.citation, "score": h.score, "rank": h.rank})
                for h in hits if self.min_score is None or h.score >= self.min_score]


def as_langchain_tool(tool: Tool) -> BaseTool:
    """An hhh tool as a LangChain StructuredTool: the same name, description and typed arguments; its errors come
    back to the agent as the tool's text (handle_tool_error), as they do in hhh's own ReAct loop."""

    def run(**kwargs: Any) -> str:
        import json

        try:
            return tool.call(json.dumps(kwargs))
        except ToolError as e:
            raise ToolException(str(e)) from None

    return StructuredTool.from_function(func=run, name=tool.name, description=tool.description,
                                        args_schema=_schema(tool), handle_tool_error=True)


def _schema(tool: Tool):
    import inspect

    from pydantic import create_model

    fields: dict[str, Any] = {
        p.name: (p.annotation, ... if p.default is inspect.Parameter.empty else p.default) for p in tool.parameters}
    return create_model(f"{tool.name}_arguments", **fields)


def sandbox_tool() -> BaseTool:
    """The PAL sandbox (hhh.apps.sandbox: bubblewrap, prlimit, allow-listed imports) as a LangChain tool."""
    from hhh.apps.tools import tool

    return as_langchain_tool(tool(python, name="python_sandbox"))
