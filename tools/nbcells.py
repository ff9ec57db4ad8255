"""The two cell constructors the notebook sources (tools/make_notebooks.py, tools/chapters_basics.py) use."""
import nbformat


def md(s):
    return nbformat.v4.new_markdown_cell(s.strip())


def code(s):
    return nbformat.v4.new_code_cell(s.strip())
