/**
 * A request's fields checked against the types the contract gives them, before a call.
 *
 * grpc-js serializes a request only as it sends it, and a field its type cannot hold
 * (`maxTokens: 2 ** 32`, `1.5`, `ttlSeconds: -1`, a role given as "user") failed the call
 * `INTERNAL` ("Request message serialization failure: invalid int32"), the code of a
 * gateway bug, naming no field; some (`temperature: "0.5"`, `content: 5`) went out
 * converted without a word. Each field's type is read from the descriptor ts-proto writes
 * beside the generated code (`outputSchema`), so a field added to the contract is checked
 * with no change here.
 *
 * @example
 *   checkRequest(".llmgateway.v1.CompleteRequest", { params: { maxTokens: 1.5 } });
 *   // RangeError: params.maxTokens must be an integer -2147483648..2147483647; got 1.5
 */
import type {
  DescriptorProto,
  EnumDescriptorProto,
  FieldDescriptorProto,
  FileDescriptorProto,
} from "ts-proto-descriptors";

import { types } from "node:util";

import { protoMetadata } from "../../../generated/ts/llmgateway/v1/gateway";

/** `FieldDescriptorProto.Type` and `.Label` numbers (google/protobuf/descriptor.proto). */
const TYPE_DOUBLE = 1;
const TYPE_FLOAT = 2;
const TYPE_INT64 = 3;
const TYPE_UINT64 = 4;
const TYPE_INT32 = 5;
const TYPE_FIXED64 = 6;
const TYPE_FIXED32 = 7;
const TYPE_BOOL = 8;
const TYPE_STRING = 9;
const TYPE_MESSAGE = 11;
const TYPE_BYTES = 12;
const TYPE_UINT32 = 13;
const TYPE_ENUM = 14;
const TYPE_SFIXED32 = 15;
const TYPE_SFIXED64 = 16;
const TYPE_SINT32 = 17;
const TYPE_SINT64 = 18;
const LABEL_REPEATED = 3;

interface IntegerRange {
  min: bigint;
  max: bigint;
}

const INT32: IntegerRange = { min: -(2n ** 31n), max: 2n ** 31n - 1n };
const UINT32: IntegerRange = { min: 0n, max: 2n ** 32n - 1n };
const INT64: IntegerRange = { min: -(2n ** 63n), max: 2n ** 63n - 1n };
const UINT64: IntegerRange = { min: 0n, max: 2n ** 64n - 1n };

/** Each integer type's range; the 64-bit ones also take a bigint. */
const INTEGER_RANGES: ReadonlyMap<number, IntegerRange> = new Map([
  [TYPE_INT32, INT32],
  [TYPE_SINT32, INT32],
  [TYPE_SFIXED32, INT32],
  [TYPE_ENUM, INT32],
  [TYPE_UINT32, UINT32],
  [TYPE_FIXED32, UINT32],
  [TYPE_INT64, INT64],
  [TYPE_SINT64, INT64],
  [TYPE_SFIXED64, INT64],
  [TYPE_UINT64, UINT64],
  [TYPE_FIXED64, UINT64],
]);

const SAFE: IntegerRange = {
  min: BigInt(Number.MIN_SAFE_INTEGER),
  max: BigInt(Number.MAX_SAFE_INTEGER),
};

/** The largest finite float32 (a float field takes any number up to it, and the infinities). */
const FLOAT32_MAX = 3.4028234663852886e38;

interface FileMetadata {
  fileDescriptor: FileDescriptorProto;
  dependencies?: FileMetadata[];
}

interface Types {
  messages: Map<string, DescriptorProto>;
  enums: Map<string, EnumDescriptorProto>;
}

/** Every message and enum of `file` and the files it imports, by full name (".a.b.Name"). */
function typesOf(
  file: FileMetadata,
  into: Types = { messages: new Map(), enums: new Map() },
): Types {
  const scope = file.fileDescriptor.package ? `.${file.fileDescriptor.package}` : "";
  addTypes(scope, file.fileDescriptor.messageType, file.fileDescriptor.enumType, into);
  for (const dependency of file.dependencies ?? []) {
    typesOf(dependency, into);
  }
  return into;
}

function addTypes(
  scope: string,
  messages: DescriptorProto[],
  enums: EnumDescriptorProto[],
  into: Types,
): void {
  for (const each of enums) {
    into.enums.set(`${scope}.${each.name}`, each);
  }
  for (const message of messages) {
    const name = `${scope}.${message.name}`;
    into.messages.set(name, message);
    addTypes(name, message.nestedType, message.enumType, into);
  }
}

const TYPES = typesOf(protoMetadata);

/** `.llmgateway.v1.Role` as a caller writes it: `Role`. */
function shortName(typeName: string): string {
  return typeName.slice(typeName.lastIndexOf(".") + 1);
}

/**
 * Whether `value` is a built-in object that keeps what it holds out of its properties (a
 * Map's entries, a Date's time): read as a message or a map, it is an empty object.
 */
function holdsNoProperties(value: object): boolean {
  return (
    types.isMap(value) ||
    types.isSet(value) ||
    types.isDate(value) ||
    types.isWeakMap(value) ||
    types.isWeakSet(value)
  );
}

/**
 * What a value is, for errors: its `typeof`, with null and arrays told apart, and a
 * built-in that is no plain object by its class (`Map`, `Date`).
 */
export function kindOf(value: unknown): string {
  if (value === null) {
    return "null";
  }
  if (Array.isArray(value)) {
    return "array";
  }
  if (typeof value === "object" && holdsNoProperties(value)) {
    return Object.prototype.toString.call(value).slice("[object ".length, -1);
  }
  return typeof value;
}

/**
 * An object whose fields are its properties. Not a Map or a Date: `fromPartial` read them
 * as an empty object, so `labels: new Map([["team", "search"]])` went out with no labels
 * (a usage filter with none, every row), and `startTime: new Date()` as 1970.
 */
function isRecord(value: unknown): value is Record<string, unknown> {
  return (
    typeof value === "object" && value !== null && !Array.isArray(value) && !holdsNoProperties(value)
  );
}

/** How to give what a Map or a Date holds as the object a field takes; "" for others. */
function plainObjectHint(value: unknown): string {
  if (types.isMap(value)) {
    return " (Object.fromEntries(map) is one)";
  }
  if (types.isDate(value)) {
    return " ({ seconds: Math.floor(date.getTime() / 1000), nanos: 0 } is one)";
  }
  return "";
}

function messageOf(typeName: string): DescriptorProto {
  const message = TYPES.messages.get(typeName);
  if (message === undefined) {
    throw new Error(`${typeName} is not a message of the contract`);
  }
  return message;
}

/** `where` joined with a field's name: `params` + `maxTokens` is `params.maxTokens`. */
function fieldPath(where: string, name: string): string {
  return where ? `${where}.${name}` : name;
}

/**
 * Refuse `value` unless each of its fields holds what the field's type takes on the wire,
 * naming the first that does not by its path (`messages[1].role`). `typeName` is the full
 * name of a message of the contract (`.llmgateway.v1.CompleteRequest`), `where` what the
 * caller calls `value` (`request`), or "" for none: then paths start at its fields.
 *
 * A field left out, `undefined` or `null`, is unset, as ts-proto's `fromPartial` takes
 * it. A name the message has no field for (`max_tokens` for `maxTokens`) is refused.
 *
 * @throws TypeError a value of the wrong type (a string where a number goes, a number
 *   where an object or an array goes), or a name the message has no field for.
 * @throws RangeError a number its field cannot hold: not an integer, or out of its range.
 */
export function checkRequest(typeName: string, value: unknown, where = ""): void {
  const message = messageOf(typeName);
  if (!isRecord(value)) {
    const named = where || "request";
    throw new TypeError(
      `${named}: expected a ${message.name} object, got ${kindOf(value)}${plainObjectHint(value)}`,
    );
  }
  checkFields(message, value, where);
}

/** Each message's field names as a request gives them (`maxTokens`), made once a message. */
const FIELD_NAMES = new Map<DescriptorProto, ReadonlySet<string>>();

function fieldNamesOf(message: DescriptorProto): ReadonlySet<string> {
  let names = FIELD_NAMES.get(message);
  if (names === undefined) {
    names = new Set(message.field.map((field) => field.jsonName));
    FIELD_NAMES.set(message, names);
  }
  return names;
}

/**
 * Refuse a name `message` has no field for: `fromPartial` drops it without a word, so
 * `params: { max_tokens: 5 }` (the contract's own spelling) was sent with no limit at all,
 * where Python's message types refuse a field they do not have.
 */
function checkNames(message: DescriptorProto, value: Record<string, unknown>, where: string): void {
  const names = fieldNamesOf(message);
  for (const name of Object.keys(value)) {
    if (!names.has(name)) {
      const meant = message.field.find((field) => field.name === name)?.jsonName;
      const hint = meant === undefined ? "" : ` (the field is ${meant})`;
      throw new TypeError(`${fieldPath(where, name)}: ${message.name} has no such field${hint}`);
    }
  }
}

function checkFields(
  message: DescriptorProto,
  value: Record<string, unknown>,
  where: string,
): void {
  checkNames(message, value, where);
  for (const field of message.field) {
    const given = value[field.jsonName];
    if (given !== undefined && given !== null) {
      checkField(field, given, fieldPath(where, field.jsonName));
    }
  }
}

function checkField(field: FieldDescriptorProto, value: unknown, where: string): void {
  const entry = field.type === TYPE_MESSAGE ? messageOf(field.typeName) : undefined;
  if (entry?.options?.mapEntry) {
    checkMap(entry, value, where);
  } else if (field.label === LABEL_REPEATED) {
    if (!Array.isArray(value)) {
      throw new TypeError(`${where}: expected an array, got ${kindOf(value)}`);
    }
    // Every index, not forEach's: a hole (`[, message]`) skipped here went out as the
    // string "undefined" (a stop sequence), or failed the call INTERNAL, naming nothing.
    for (let index = 0; index < value.length; index++) {
      checkOne(field, value[index], `${where}[${index}]`);
    }
  } else {
    checkOne(field, value, where);
  }
}

/** A map field: an object whose values each hold what the entry's `value` field takes. */
function checkMap(entry: DescriptorProto, value: unknown, where: string): void {
  const valueField = entry.field.find((field) => field.name === "value");
  if (!isRecord(value) || valueField === undefined) {
    const hint = plainObjectHint(value);
    throw new TypeError(`${where}: expected an object, got ${kindOf(value)}${hint}`);
  }
  for (const [key, each] of Object.entries(value)) {
    checkOne(valueField, each, `${where}[${JSON.stringify(key)}]`);
  }
}

/** One value of `field` (an element, for a repeated field). */
function checkOne(field: FieldDescriptorProto, value: unknown, where: string): void {
  const range = INTEGER_RANGES.get(field.type);
  if (field.type === TYPE_MESSAGE) {
    checkRequest(field.typeName, value, where);
  } else if (field.type === TYPE_ENUM && typeof value !== "number") {
    const named = shortName(field.typeName);
    const example = TYPES.enums.get(field.typeName)?.value[1]?.name;
    const hint = example === undefined ? "" : ` (${named}.${example}, ...)`;
    throw new TypeError(`${where}: expected a ${named}${hint}, got ${kindOf(value)}`);
  } else if (range !== undefined) {
    checkInteger(value, range, where);
  } else if (field.type === TYPE_DOUBLE || field.type === TYPE_FLOAT) {
    checkNumber(value, field.type === TYPE_FLOAT, where);
  } else if (field.type === TYPE_BOOL && typeof value !== "boolean") {
    throw new TypeError(`${where}: expected a boolean, got ${kindOf(value)}`);
  } else if (field.type === TYPE_STRING && typeof value !== "string") {
    throw new TypeError(`${where}: expected a string, got ${kindOf(value)}`);
  } else if (field.type === TYPE_BYTES && !(value instanceof Uint8Array)) {
    throw new TypeError(`${where}: expected a Uint8Array, got ${kindOf(value)}`);
  }
}

/**
 * An integer its range holds: a number, whose range stops at `Number.MAX_SAFE_INTEGER` (a
 * larger one has already lost its last digits), or, for a 64-bit field, a bigint.
 */
function checkInteger(value: unknown, range: IntegerRange, where: string): void {
  const isWide = range === INT64 || range === UINT64;
  if (!(typeof value === "number" || (isWide && typeof value === "bigint"))) {
    throw new TypeError(`${where}: expected an integer, got ${kindOf(value)}`);
  }
  const holds =
    typeof value === "bigint"
      ? range.min <= value && value <= range.max
      : Number.isInteger(value) && within(BigInt(value), range, SAFE);
  if (!holds) {
    const min = typeof value === "bigint" ? range.min : maxOf(range.min, SAFE.min);
    const max = typeof value === "bigint" ? range.max : minOf(range.max, SAFE.max);
    throw new RangeError(`${where} must be an integer ${min}..${max}; got ${value}`);
  }
}

function within(value: bigint, ...ranges: IntegerRange[]): boolean {
  return ranges.every((range) => range.min <= value && value <= range.max);
}

function maxOf(a: bigint, b: bigint): bigint {
  return a > b ? a : b;
}

function minOf(a: bigint, b: bigint): bigint {
  return a < b ? a : b;
}

/** Any number (NaN and the infinities are doubles too: the gateway judges them). */
function checkNumber(value: unknown, isFloat32: boolean, where: string): void {
  if (typeof value !== "number") {
    throw new TypeError(`${where}: expected a number, got ${kindOf(value)}`);
  }
  if (isFloat32 && Number.isFinite(value) && Math.abs(value) > FLOAT32_MAX) {
    throw new RangeError(`${where} must be a number within ±${FLOAT32_MAX}; got ${value}`);
  }
}
