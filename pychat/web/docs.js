// The API docs page: /api/openapi.json rendered as sections per tag, one <details> per operation.

const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

let doc;

// The contract's files, as the server serves them: named in a description, they are links.
const CONTRACT = { "openapi.json": "/api/openapi.json", "ws-frames.schema.json": "/api/ws-frames.schema.json" };

function prose(tag, text, links = true) {
  // A description as written in the contract: `code` spans as code, the contract's files as links
  // (not inside a <summary>, itself a control).
  const e = el(tag);
  text.split(/(`[^`]+`)/).forEach((part, i) => {
    if (i % 2) return e.append(el("code", "", part.slice(1, -1)));
    if (!links) return e.append(part);
    part.split(/(openapi\.json|ws-frames\.schema\.json)/).forEach((piece, j) => {
      if (!(j % 2)) return e.append(piece);
      const a = el("a", "", piece);
      a.href = CONTRACT[piece];
      e.append(a);
    });
  });
  return e;
}

// In a schema outline (preformatted text already) a description's backticks would only be noise.
const plain = (text) => text.replace(/`/g, "");

function resolve(node) {
  // A local $ref ("#/components/...") followed to what it names.
  let seen = 0;
  while (node && node.$ref && seen++ < 20) {
    node = node.$ref.replace(/^#\//, "").split("/").reduce((o, k) => o?.[k.replace(/~1/g, "/").replace(/~0/g, "~")], doc);
  }
  return node || {};
}

function schemaText(schema, depth = 0) {
  // A compact, readable outline of a JSON Schema: fields, types, what is required.
  const s = resolve(schema);
  const pad = "  ".repeat(depth);
  if (depth > 6) return `${pad}…`;
  const name = schema?.$ref ? schema.$ref.split("/").pop() + " " : "";
  if (s.type === "object" || s.properties) {
    const req = new Set(s.required || []);
    const lines = Object.entries(s.properties || {}).map(([k, v]) => {
      const r = resolve(v);
      const nested = r.type === "object" || r.properties || (r.type === "array" && (resolve(r.items).properties));
      const head = `${pad}  ${k}${req.has(k) ? "" : "?"}: ${typeOf(v)}${r.description ? "  // " + plain(r.description) : ""}`;
      return nested ? head + "\n" + schemaText(r.type === "array" ? r.items : v, depth + 2) : head;
    });
    return `${pad}${name}{\n${lines.join("\n")}\n${pad}}`;
  }
  return `${pad}${name}${typeOf(schema)}`;
}

function typeOf(schema) {
  const s = resolve(schema);
  if (schema?.$ref && (s.properties || s.type === "object")) return schema.$ref.split("/").pop();
  if (s.enum) return s.enum.map((x) => JSON.stringify(x)).join(" | ");
  if (s.type === "array") return `${typeOf(s.items)}[]`;
  if (s.oneOf || s.anyOf) return (s.oneOf || s.anyOf).map(typeOf).join(" | ");
  return Array.isArray(s.type) ? s.type.join(" | ") : s.type || "any";
}

function operation(path, method, op) {
  const d = el("details", "op");
  d.id = op.operationId || `${method}-${path}`;
  const sum = el("summary");
  sum.append(el("code", `method ${method}`, method.toUpperCase()), " ", el("code", "path", path), " ", prose("span", op.summary || "", false));
  d.append(sum);
  if (op.description) d.append(prose("p", op.description));
  const params = [...(doc.paths[path].parameters || []), ...(op.parameters || [])].map(resolve);
  if (params.length) {
    const t = el("table");
    t.append(el("caption", "", "Parameters"));
    const head = el("tr");
    ["name", "type", "description"].forEach((h) => head.append(el("th", "", h)));
    t.append(head);
    for (const p of params) {
      // Three columns, so the table fits a phone: where it goes and whether it must, under the name.
      const name = el("td");
      name.append(el("code", "", p.name), el("div", "small", `${p.in}${p.required ? ", required" : ""}`));
      const tr = el("tr");
      tr.append(name, el("td", "", typeOf(p.schema)), prose("td", p.description || ""));
      t.append(tr);
    }
    d.append(t);
  }
  const body = resolve(op.requestBody);
  for (const [type, media] of Object.entries(body.content || {})) {
    d.append(el("h3", "", `Request body (${type})`), el("pre", "", media.schema ? schemaText(media.schema) : "bytes"));
  }
  d.append(el("h3", "", "Responses"));
  const dl = el("dl");
  for (const [code, raw] of Object.entries(op.responses || {})) {
    const r = resolve(raw);
    const dd = prose("dd", r.description || "");
    for (const [type, media] of Object.entries(r.content || {})) {
      if (media.schema) dd.append(el("pre", "", `${type}\n${schemaText(media.schema)}`));
    }
    dl.append(el("dt", "", code), dd);
  }
  d.append(dl);
  return d;
}

async function main() {
  const r = await fetch("/api/openapi.json");
  doc = await r.json();
  // "pychat API v1": the contract's title and version (info.version is the protocol's, "1").
  const name = doc.info?.title || "pychat";
  const version = String(doc.info?.version || "").replace(/^v/i, "");
  let title = /\bAPI\b/.test(name) ? name : `${name} API`;
  if (version) title += ` v${version}`;
  document.title = title;
  document.getElementById("docs-title").textContent = title;
  const byTag = new Map((doc.tags || []).map((t) => [t.name, []]));
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (!["get", "post", "put", "patch", "delete"].includes(method)) continue;
      const tag = op.tags?.[0] || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push(operation(path, method, op));
    }
  }
  const body = document.getElementById("docs-body");
  const toc = document.getElementById("docs-toc");
  body.replaceChildren();
  for (const [tag, ops] of byTag) {
    if (!ops.length) continue;
    const sec = el("section");
    sec.id = `tag-${tag}`;
    sec.append(el("h2", "", tag), ...ops);
    body.append(sec);
    toc.append(tocLink(`tag-${tag}`, tag));
  }
  const schemas = el("section");
  schemas.id = "tag-schemas";
  schemas.append(el("h2", "", "Schemas"));
  for (const name of Object.keys(doc.components?.schemas || {})) {
    const d = el("details", "op");
    d.id = `schema-${name}`;
    d.append(el("summary", "", name), el("pre", "", schemaText({ $ref: `#/components/schemas/${name}` })));
    schemas.append(d);
  }
  body.append(schemas);
  toc.append(tocLink("tag-schemas", "schemas"));
}

function tocLink(id, text) {
  const a = el("a", "", text);
  a.href = `#${id}`;
  const li = el("li");
  li.append(a);
  return li;
}

main().catch((e) => {
  document.getElementById("docs-body").replaceChildren(el("p", "error", `Could not load the API description: ${e.message}`));
});
