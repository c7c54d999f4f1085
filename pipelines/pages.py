"""The HTML pages headbench writes (report.html, audit.html) rendered from one place: the Jinja2 templates in
pipelines/templates (autoescaped; they share _style.html), each stamped with the headbench version and the time
it was written."""

from __future__ import annotations

from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version

__all__ = ["render_page"]


def render_page(template: str, **context) -> str:
    """`template` (a file of pipelines/templates) rendered with `context`, plus ``version`` and ``created``."""
    import jinja2

    try:
        headbench_version = version("headbench")
    except PackageNotFoundError:
        headbench_version = "(not installed)"
    environment = jinja2.Environment(loader=jinja2.PackageLoader("pipelines", "templates"),
                                     autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True)
    return environment.get_template(template).render(
        **context, version=headbench_version, created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
