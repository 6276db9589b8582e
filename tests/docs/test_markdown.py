"""Every code block of README.md and docs/*.md runs (tests/docs/markdown_blocks.py), and the collector itself fails
where it must: a snippet's assert, a stale directive, an unknown command, a wrong output, a missing picture, an extra
that pyproject.toml lacks."""

import re
import textwrap
from pathlib import Path

import pytest

from docs.markdown_blocks import REPO, MarkdownError, bash_commands, parse_blocks, run_markdown

MARKDOWN_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = "```"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_markdown_file_runs(path):
    run_markdown(path)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(textwrap.dedent(text).replace("~~~", FENCE), encoding="utf-8")
    return path


def fails(path, *patterns: str) -> str:
    with pytest.raises(MarkdownError) as caught:
        run_markdown(path)
    message = str(caught.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"
    return message


def test_blocks_share_one_seeded_namespace_and_output_is_compared(tmp_path):
    page = write(tmp_path, """\
        # A page

        ~~~python
        import numpy as np
        x = round(float(np.random.rand()), 4)
        ~~~

        ~~~python
        print(x, "shown")
        ~~~

        ~~~output
        0.5488 shown
        ~~~
        """)
    assert [(result.block.line, result.block.language) for result in run_markdown(page)] == [(3, "python"),
                                                                                              (8, "python")]


def test_failing_assert_fails_with_the_markdown_line(tmp_path):
    page = write(tmp_path, """\
        Text.

        ~~~python
        a = 1
        assert a == 2, "a is not 2"
        ~~~
        """)
    fails(page, rf"{re.escape(str(page))}:3: python block failed", rf'File "{re.escape(str(page))}", line 5',
          "assert a == 2", "AssertionError: a is not 2")


def test_wrong_output_block_fails(tmp_path):
    page = write(tmp_path, """\
        ~~~python
        print((2, 3))
        ~~~
        ~~~output
        (3, 2)
        ~~~
        """)
    fails(page, ":1: the block's output differs", r"\(2, 3\)")


def test_stale_replace_directive_fails(tmp_path):
    page = write(tmp_path, """\
        <!-- test: replace "range(1000)" "range(3)" -->
        ~~~python
        total = sum(range(100))
        ~~~
        """)
    fails(page, ":2: stale directive: replace 'range\\(1000\\)'")


def test_replace_directive_applies_and_directives_must_touch_their_block(tmp_path):
    page = write(tmp_path, """\
        <!-- test: replace "10 ** 9" "10"; replace "big" "small" -->
        ~~~python
        size = 10 ** 9  # big
        assert size == 10
        ~~~
        """)
    run_markdown(page)
    orphan = write(tmp_path, """\
        <!-- test: replace "a" "b" -->

        ~~~python
        a = 1
        ~~~
        """)
    fails(orphan, ":1: a test directive must sit on the lines right above its block")


def test_unknown_language_directive_and_command_fail(tmp_path):
    fails(write(tmp_path, "~~~ruby\nputs 1\n~~~\n"), ":1: unknown block language 'ruby'")
    fails(write(tmp_path, '<!-- test: shrink "a" -->\n~~~python\na = 1\n~~~\n'), "unknown test directive 'shrink'")
    fails(write(tmp_path, "~~~bash\nls -l  # look around\n~~~\n"), ":1: `ls -l`: unknown command")
    fails(write(tmp_path, "~~~bash\npython -c 'print(1)'\n~~~\n"), "unknown command")
    fails(write(tmp_path, "~~~bash\npython -m tinytf.train | tail\n~~~\n"), "shell syntax '\\|' is not supported")
    fails(write(tmp_path, "~~~bash\nmpiexec -n 2 python -m mpi4py -m numpy\n~~~\n"), "unknown command")


def test_bash_lines_split_into_commands():
    code = "pip install -e . && python -m tinytf.train \\\n  --iters 2  # short\nA=1 python x.py; cd runs\n"
    assert bash_commands(code, "here") == [["pip", "install", "-e", "."],
                                           ["python", "-m", "tinytf.train", "--iters", "2"],
                                           ["A=1", "python", "x.py"], ["cd", "runs"]]


def test_failing_command_fails_and_expect_error_checks_the_refusal(tmp_path):
    fails(write(tmp_path, "~~~bash\npython -m tinytf.no_such_module\n~~~\n"),
          r":1: `python -m tinytf.no_such_module`: exit status 1", "No module named")
    fails(write(tmp_path, "~~~bash\nOMP_NUM_THREADS=1 mpiexec -n 2 python -m mpi4py -m tinytf.no_such_module\n~~~\n"),
          "exit status [1-9]")
    refusal = "~~~bash\npython -m tinytf.sample --max-new-tokens -3\n~~~\n"
    run_markdown(write(tmp_path, '<!-- test: expect-error "max-new-tokens" -->\n' + refusal))
    fails(write(tmp_path, '<!-- test: expect-error "no CUDA GPU" -->\n' + refusal),
          "expected exit status 2 and 'no CUDA GPU' in the output, got status 2")


def test_pip_install_lines_are_checked_against_pyproject(tmp_path):
    run_markdown(write(tmp_path, "~~~bash\npip install -e '.[dev]' pytest && pip install 'tinytf[plot,mpi]'\n~~~\n"))
    fails(write(tmp_path, "~~~bash\npip install -e '.[docs]'\n~~~\n"), "pyproject.toml has no extra 'docs'")
    fails(write(tmp_path, "~~~bash\npip install -e . requests\n~~~\n"), "requests is not a requirement")
    fails(write(tmp_path, "~~~bash\npip install -r requirements.txt\n~~~\n"), "pip option -r")


def test_linked_images_must_be_produced_valid_and_committed(tmp_path):
    svg = '<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"></svg>'
    page = write(tmp_path, f"""\
        ~~~python
        import os
        os.makedirs("images", exist_ok=True)
        open("images/a.svg", "w").write({svg!r})
        ~~~

        ![a picture](images/a.svg), and a link shown as code is no link: `![x](images/none.png)`

        ~~~text
        ![x](images/none.png)
        ~~~
        """)
    fails(page, "images/a.svg is produced but not in the repository", "--write-images")
    assert run_markdown(page, write_images=True)
    assert (tmp_path / "images" / "a.svg").read_text() == svg
    run_markdown(page)

    page.write_text(page.read_text() + "![missing](images/b.png)\n")
    fails(page, "the linked image images/b.png was not produced by the file's blocks: missing")
    page.write_text(page.read_text() + '~~~python\nopen("images/b.png", "wb").write(b"GIF89a")\n~~~\n'
                    .replace("~~~", FENCE))
    fails(page, "images/b.png .*: not a PNG")


def test_fixtures_are_made_in_the_run_folder(tmp_path):
    page = write(tmp_path, """\
        <!-- test: fixture text ../data/corpus.txt -->
        ~~~python
        text = open("../data/corpus.txt", encoding="utf-8").read()
        assert len(text) == 65536
        ~~~
        """)
    run_markdown(page)
    fails(write(tmp_path, '<!-- test: fixture text ../../escape.txt -->\n~~~python\n~~~\n'), "leaves the run's folder")
    with pytest.raises(MarkdownError, match="unknown fixture 'bert'"):
        parse_blocks('<!-- test: fixture bert models/bert -->\n~~~python\n~~~\n')


def test_relative_links_must_lead_to_files(tmp_path):
    (tmp_path / "other.md").write_text("# Other\n")
    run_markdown(write(tmp_path, "See [other](other.md#other), [the web](https://example.com) and [here](#top).\n"))
    fails(write(tmp_path, "See [chapter 9](09-missing.md).\n"), "the link 09-missing.md leads nowhere")


def test_gpt2_folder_fixture_loads_with_its_tokenizer(tmp_path):
    page = write(tmp_path, """\
        <!-- test: fixture gpt2-folder models/gpt2 -->
        ~~~python
        from tokenizers import Tokenizer
        from tinytf.interop import from_pretrained

        model = from_pretrained("models/gpt2")
        tokenizer = Tokenizer.from_file("models/gpt2/tokenizer.json")
        assert model.config.vocab_size == tokenizer.get_vocab_size()
        assert tokenizer.decode(tokenizer.encode("def f(x):").ids) == "def f(x):"
        ~~~
        """)
    run_markdown(page)
