"""One HTML layer for the reports and the dashboard: one stylesheet, one page shell, and one table that escapes every
cell unless the caller marks it as markup (markupsafe.Markup). A record's text (a training example, a model's answer,
a quarantined line) reaches a page only through these, so it cannot become markup by a wrong import or a missed escape."""

from __future__ import annotations

from markupsafe import Markup, escape

__all__ = ["Markup", "STYLE", "document", "escape", "script_json", "table"]

STYLE = ("body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1200px;color:#222}a{color:#1f5fa8}"
         "table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;font-size:13px;vertical-align:top}"
         "th{background:#f3f3f3}svg{display:block;margin:1em 0}nav a{margin-right:1em}.bad{color:#b00020}.ok{color:#0a7d32}button{margin:2px}"
         "pre{background:#f6f6f6;padding:.6em;max-height:24em;overflow:auto}.chart{margin:.5em 0}.filters{margin:.5em 0}"
         ".panes{display:flex;gap:1em}.pane{flex:1;border:1px solid #ccc;padding:.6em;min-height:8em}.answer{white-space:pre-wrap;margin-top:.5em}"
         ".status{color:#666;font-size:13px}.verdict{font-size:1.3em;font-weight:bold}.verdict.pass{color:#0a7d32}.verdict.fail{color:#b00020}")


def script_json(value) -> str:
    """JSON to put inside a <script> element: <, > and & as unicode escapes, so a string in the data ("</script>") can
    never end the element (JSON parsers read the escapes back as the same characters)."""
    import json

    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def table(headers: list, rows: list[list]) -> str:
    """An HTML table; every header and cell is escaped unless it is Markup (links, forms, charts the caller built). It
    returns a plain str: pages join it to their own markup with +, which a Markup operand would escape."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def document(title: str, body: str, head: str = "") -> str:
    """A whole page: the one stylesheet, the escaped title, `head` (meta tags, scripts of our own) and the body."""
    return (f"<!doctype html><html><head><meta charset='utf-8'>{head}<title>{escape(title)}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>")
