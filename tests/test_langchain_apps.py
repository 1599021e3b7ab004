"""hhh's retriever and tools inside LangChain (the optional extra; skipped where langchain-core is missing): the
retriever in an LCEL chain, the sandbox and hhh tools invoked the way LangChain agents invoke tools."""

import pytest

pytest.importorskip("langchain_core")

from langchain_core.runnables import RunnableLambda  # noqa: E402

from hhh.apps.langchain import HHHRetriever, as_langchain_tool, sandbox_tool  # noqa: E402
from hhh.apps.rag import Index  # noqa: E402
from hhh.apps.sandbox import available  # noqa: E402
from hhh.apps.tools import calculator, tool  # noqa: E402


def test_the_retriever_returns_documents_with_their_citations(tmp_path):
    docs = tmp_path / "d"
    docs.mkdir()
    (docs / "guide.md").write_text("# Rice\n\nBoil rice in two parts water for twelve minutes.\n\n"
                                   "# Bread\n\nLet the dough rise for an hour.\n")
    index, _ = Index.build([docs], tmp_path / "i")
    retriever = HHHRetriever(index=index, k=2)
    found = retriever.invoke("how long does dough rise")
    assert [d.metadata["section"] for d in found] == ["Bread", "Rice"]
    assert found[0].page_content == "Let the dough rise for an hour." and found[0].metadata["rank"] == 1
    assert found[0].metadata["citation"].endswith("guide.md § Bread") and found[0].metadata["score"] > 0.3
    assert len(HHHRetriever(index=index, k=2, min_score=found[0].metadata["score"] - 1e-6).invoke(
        "how long does dough rise")) == 1
    # composed in a chain, as a RAG prompt would use it
    chain = retriever | RunnableLambda(lambda ds: "\n".join(f"[{d.metadata['rank']}] {d.page_content}" for d in ds))
    assert chain.invoke("rice cooking time").startswith("[1] Boil rice")


def test_hhh_tools_keep_their_typed_arguments_and_report_errors_as_text():
    calc = as_langchain_tool(tool(calculator))
    assert calc.name == "calculator" and set(calc.args) == {"expression"}
    assert calc.invoke({"expression": "6 * 7"}) == "42"
    assert calc.invoke({"expression": "1 / 0"}) == "division by zero"  # handed back to the agent, not raised

    def price(item: str, quantity: int = 1) -> float:
        """Price of an item."""
        return 0.5 * quantity

    lc = as_langchain_tool(tool(price))
    assert lc.invoke({"item": "apple", "quantity": 4}) == "2.0"
    with pytest.raises(Exception, match="quantity"):  # LangChain validates against the schema before the call
        lc.invoke({"item": "apple", "quantity": "many"})


@pytest.mark.skipif(available() is not None, reason=available() or "")
def test_the_sandbox_as_a_langchain_tool():
    box = sandbox_tool()
    assert box.name == "python_sandbox" and set(box.args) == {"code"}
    assert box.invoke({"code": "print('hi')\nanswer = 6 * 7"}) == "hi\nanswer = 42"
    assert "not allowed in the sandbox" in box.invoke({"code": "import socket"})
