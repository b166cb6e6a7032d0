// Checks a message from the broker against the schema of every server message
// (wire_schema.js, generated from broker/signaling/protocol.py, the definitions the
// Python client decodes with), before any screen reads it.
//
// It applies the JSON Schema keywords the generator lets through and no other
// (broker/contract/browser_schema.py KEYWORDS): type, enum, required, properties,
// additionalProperties, items, minLength/maxLength (in Unicode characters),
// pattern, minimum/maximum, anyOf, oneOf, not, $ref, and the `type`
// discriminator of the union. No eval: patterns are RegExp objects, made once.
//
// The answer names what failed by field path and reason only, never a value: an
// extra field is reported by the path of the object that holds it, not by its
// name (a name the broker sent is as much its content as a value is).

import { DEFS, ROOT } from "./wire_schema.js";

const PREFIX = "#/$defs/";
const patterns = new Map();

function pattern(source) {
  let re = patterns.get(source);
  if (!re) {
    re = new RegExp(source, "u");
    patterns.set(source, re);
  }
  return re;
}

function resolve(ref) {
  const name = ref.startsWith(PREFIX) ? ref.slice(PREFIX.length) : null;
  if (name === null || !Object.hasOwn(DEFS, name)) throw new Error(`wire_schema.js has no ${ref}`);
  return DEFS[name];
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function hasType(value, type) {
  switch (type) {
    case "object":
      return isObject(value);
    case "array":
      return Array.isArray(value);
    case "string":
      return typeof value === "string";
    case "integer":
      return Number.isInteger(value);
    case "number":
      return typeof value === "number" && Number.isFinite(value);
    case "boolean":
      return typeof value === "boolean";
    case "null":
      return value === null;
    default:
      return false;
  }
}

/** Length in Unicode characters (code points), as JSON Schema and Python count it. */
function characters(text) {
  let count = 0;
  for (let i = 0; i < text.length; i += 1) {
    const unit = text.charCodeAt(i);
    if (unit >= 0xd800 && unit <= 0xdbff && i + 1 < text.length) {
      const next = text.charCodeAt(i + 1);
      if (next >= 0xdc00 && next <= 0xdfff) i += 1;
    }
    count += 1;
  }
  return count;
}

const fail = (path, reason) => ({ path, reason });

function check(schema, value, path) {
  if (schema.$ref !== undefined) {
    const problem = check(resolve(schema.$ref), value, path);
    if (problem) return problem;
  }
  if (schema.type !== undefined && !hasType(value, schema.type)) return fail(path, "type");
  if (schema.enum !== undefined && !schema.enum.includes(value)) return fail(path, "enum");
  if (typeof value === "string") {
    // Never more characters than UTF-16 units: count them only when the units do not decide.
    const { maxLength: most, minLength: least } = schema;
    if (most !== undefined && value.length > most && characters(value) > most) return fail(path, "length");
    if (least !== undefined && (value.length < least || characters(value) < least)) return fail(path, "length");
    if (schema.pattern !== undefined && !pattern(schema.pattern).test(value)) return fail(path, "pattern");
  }
  if (typeof value === "number") {
    if (schema.minimum !== undefined && value < schema.minimum) return fail(path, "range");
    if (schema.maximum !== undefined && value > schema.maximum) return fail(path, "range");
  }
  if (Array.isArray(value) && schema.items !== undefined) {
    for (let i = 0; i < value.length; i += 1) {
      const problem = check(schema.items, value[i], `${path}[${i}]`);
      if (problem) return problem;
    }
  }
  if (isObject(value)) {
    const problem = checkObject(schema, value, path);
    if (problem) return problem;
  }
  if (schema.discriminator !== undefined) return checkTagged(schema.discriminator, value, path);
  if (schema.anyOf !== undefined) {
    const problems = schema.anyOf.map((sub) => check(sub, value, path));
    if (!problems.includes(null)) return problems[0];
  }
  if (schema.oneOf !== undefined) {
    const fits = schema.oneOf.filter((sub) => check(sub, value, path) === null).length;
    if (fits !== 1) return fail(path, "form");
  }
  if (schema.not !== undefined && check(schema.not, value, path) === null) return fail(path, "type");
  return null;
}

function checkObject(schema, value, path) {
  const at = (name) => (path ? `${path}.${name}` : name);
  const properties = schema.properties ?? {};
  for (const name of schema.required ?? []) {
    if (!Object.hasOwn(value, name)) return fail(at(name), "missing");
  }
  for (const name of Object.keys(properties)) {
    if (!Object.hasOwn(value, name)) continue;
    const problem = check(properties[name], value[name], at(name));
    if (problem) return problem;
  }
  const extra = schema.additionalProperties;
  if (extra !== undefined) {
    for (const name of Object.keys(value)) {
      if (Object.hasOwn(properties, name)) continue;
      if (extra === false) return fail(path || "(message)", "extra_field");
      const problem = check(extra, value[name], path ? `${path}.*` : "*");
      if (problem) return problem;
    }
  }
  return null;
}

/** A union told apart by one field (the message's `type`): only the named member is checked. */
function checkTagged({ propertyName, mapping }, value, path) {
  if (!isObject(value)) return fail(path || "(message)", "type");
  const tag = value[propertyName];
  if (typeof tag !== "string" || !Object.hasOwn(mapping, tag)) return fail(propertyName, "enum");
  return check({ $ref: mapping[tag] }, value, path);
}

/** The `type` of a message the broker may send, for logs; "unknown" for anything else. */
export function typeOf(message) {
  const tag = isObject(message) ? message.type : undefined;
  const { mapping } = DEFS[ROOT.slice(PREFIX.length)].discriminator;
  return typeof tag === "string" && Object.hasOwn(mapping, tag) ? tag : "unknown";
}

/**
 * Check one parsed frame from the broker. Null when it fits the schema; else
 * {type, field, reason}: the message's type (or "unknown"), the path of the
 * field that failed ("peers[0].role"; "(message)" for the whole frame), and why:
 * missing, type, enum, length, pattern, range, extra_field or form.
 */
export function checkServerMessage(message) {
  const problem = check({ $ref: ROOT }, message, "");
  if (!problem) return null;
  return { type: typeOf(message), field: problem.path || "(message)", reason: problem.reason };
}
