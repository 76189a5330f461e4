"""Small recipe texts shared by the recipe tests."""
import textwrap

GOOD = textwrap.dedent("""\
    name: test-fp16
    version: 1.2.3
    target: jetson-xavier-agx-32gb
    stages:
      - export:
          precision: fp16
          opset: 17
      - check:
          min_agreement: 0.99
""")


def write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p
