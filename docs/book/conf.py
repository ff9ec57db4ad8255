# Sphinx configuration of the workbook's book. tools/build_book.py copies this folder, the executed notebooks and the
# reference pages into one source folder (build/book_src) and runs sphinx-build there; nothing here runs a notebook.
import logging
from pathlib import Path

project = "dit-workbook"
author = "dit-workbook"
html_title = "dit-workbook"
language = "en"

extensions = ["myst_nb", "sphinx_copybutton"]
nb_execution_mode = "off"                  # the committed outputs are the book; never re-execute
nb_merge_streams = True
myst_heading_anchors = 4                   # links such as solutions.md#chapter-07 and chapter.ipynb#exercises
myst_enable_extensions = ["colon_fence"]   # no dollarmath: the chapters hold no maths, so no MathJax is loaded
exclude_patterns = ["_build", "_originals/**", "**/.ipynb_checkpoints"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]

html_theme = "sphinx_book_theme"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": False,          # each chapter links its own .ipynb and .py at the top
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "home_page_in_toc": True,
    "navigation_with_keys": False,
}
html_static_path = ["_static"]
html_css_files = ["calculator.css"]
html_copy_source = False
html_show_sourcelink = False
html_last_updated_fmt = None
html_use_index = False                     # no index entries in the chapters: an empty page otherwise
html_context = {"default_mode": "auto"}    # light or dark as the reader's system prefers, switchable
# Search in English and Chinese: jieba cuts Chinese text into words, the glossary's terms (written by the build into
# _jieba_words.txt) kept whole. No result summaries: those are fetched page by page, which a file:// page cannot do.
html_search_language = "zh"
html_search_options = {"dict": str(Path(__file__).with_name("_jieba_words.txt"))}
html_show_search_summary = False
try:
    import jieba
    jieba.setLogLevel(logging.WARNING)     # not its progress lines on every build
except ImportError:                        # Sphinx then indexes Latin words only: tools/build_book.py stops first
    pass
