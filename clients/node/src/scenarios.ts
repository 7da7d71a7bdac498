/**
 * Scenarios that tests/integration/test_node_client.py runs against a real gateway.
 *
 *   node scenarios.js SCENARIO --address HOST:PORT [--model NAME] [--status-base64 B64]
 *     [--code N] [--leave HOW] [--timeout-ms MS] [--default-timeout-ms MS]
 *     [--tls] [--ca-file PEM] [--cert-file PEM] [--key-file PEM] [--pem-bytes]
 *     [--prompt-words N]
 *   node scenarios.js serve    (scenarios' arguments as JSON lines on stdin: see `serve`)
 *
 * Each scenario uses the typed client exactly as a caller would and prints one JSON line
 * describing what it saw; the Python test decides whether that is right.
 */
import * as fs from "node:fs";
import * as readline from "node:readline";
import { performance } from "node:perf_hooks";
import * as util from "node:util";

import * as grpc from "@grpc/grpc-js";

import {
  BatchEvent,
  BatchResults,
  CompleteRequest,
  CompleteStreamRequest,
  CompletionMetadata,
  CompletionStream,
  GatewayCallError,
  GatewayClient,
  GatewayClientOptions,
  GetUsageRequest,
  ReasoningEffort,
  STATUS_DETAILS_KEY,
  Role,
  StatusDetails,
  StreamEvent,
  TlsOptions,
  UsageRow,
  checkAddress,
  decodeStatusDetails,
  finishReasonToJSON,
  isLoopbackAddress,
  upstreamHealthToJSON,
} from "./client";

type Json = Record<string, unknown>;

/**
 * The deadline of a scenario's calls that need none of their own: a hang guard, long enough
 * for a busy CI machine, and shorter than the test's guard on the whole scenario.
 */
const CALL_GUARD_MS = 60_000;

interface Args {
  scenario: string;
  address: string;
  model: string;
  statusBase64: string;
  /** With `decode`: the call's own status code, the trailer's status decoded as a call's. */
  code: number | undefined;
  apiKey: string | undefined;
  /** Any value, as a caller might pass it: `timeoutArg`. */
  defaultTimeoutMs: unknown;
  /** Set by `--tls` or any PEM file: the client connects with these TLS options. */
  tls: TlsOptions | undefined;
  /** Hand the client the PEM files' bytes rather than their paths. */
  pemBytes: boolean;
  /**
   * With `overload-recovers`, `complete` and `try-complete`: the call's prompt is this many
   * words, not "Say hi".
   */
  promptWords: number;
  /** With `timed-calls`: each call's own `timeoutMs` (`timeoutArg`). */
  timeoutMs: unknown;
  /** With `leave-buffered`: how the stream is left (`cancel`, `abort`, `return`, ...). */
  leave: string;
}

/**
 * A timeout flag's value as JSON (`null`, `"500"` a string, `true`), else as a number
 * (`NaN`, `Infinity`): what a caller might hand the client.
 */
function timeoutArg(value: string): unknown {
  try {
    return JSON.parse(value);
  } catch {
    return Number(value);
  }
}

/** Add a TLS option to the ones parsed so far, turning TLS on. */
function withTls(args: Args, option: Partial<TlsOptions>): void {
  args.tls = { ...args.tls, ...option };
}

function parseArgs(argv: string[]): Args {
  const args: Args = {
    scenario: argv[0] ?? "",
    address: "",
    model: "fake-model",
    statusBase64: "",
    code: undefined,
    apiKey: undefined,
    defaultTimeoutMs: undefined,
    tls: undefined,
    pemBytes: false,
    promptWords: 0,
    timeoutMs: undefined,
    leave: "",
  };
  for (let i = 1; i < argv.length; i++) {
    const flag = argv[i];
    if (flag === "--tls") {
      withTls(args, {});
      continue;
    }
    if (flag === "--pem-bytes") {
      args.pemBytes = true;
      continue;
    }
    const value = argv[++i] ?? "";
    switch (flag) {
      case "--ca-file":
        withTls(args, { caFile: value });
        break;
      case "--cert-file":
        withTls(args, { certFile: value });
        break;
      case "--key-file":
        withTls(args, { keyFile: value });
        break;
      case "--address":
        args.address = value;
        break;
      case "--model":
        args.model = value;
        break;
      case "--status-base64":
        args.statusBase64 = value;
        break;
      case "--code":
        args.code = Number(value);
        break;
      case "--api-key":
        args.apiKey = value;
        break;
      case "--default-timeout-ms":
        args.defaultTimeoutMs = timeoutArg(value);
        break;
      case "--prompt-words":
        args.promptWords = Number(value);
        break;
      case "--timeout-ms":
        args.timeoutMs = timeoutArg(value);
        break;
      case "--leave":
        args.leave = value;
        break;
      default:
        throw new Error(`unknown argument ${flag}`);
    }
  }
  return args;
}

function readPem(file: string | undefined): Buffer | undefined {
  return file === undefined ? undefined : fs.readFileSync(file);
}

/** The same TLS options with each PEM file read, as a caller with PEMs in memory has them. */
function asPemBytes(tls: TlsOptions): TlsOptions {
  return { ca: readPem(tls.caFile), cert: readPem(tls.certFile), key: readPem(tls.keyFile) };
}

function metadataJson(metadata: CompletionMetadata): Json {
  return {
    finishReason: finishReasonToJSON(metadata.finishReason),
    inputTokens: metadata.usage?.inputTokens,
    outputTokens: metadata.usage?.outputTokens,
    costUsd: metadata.costUsd,
    upstream: metadata.upstream,
  };
}

function errorJson(error: unknown): Json {
  if (!(error instanceof GatewayCallError)) {
    throw error;
  }
  return {
    code: error.codeName,
    message: error.message,
    attempts: error.attempts,
    pushbackMs: error.pushbackMs,
    retryElsewhere: error.retryElsewhere,
    details: error.details,
  };
}

function messages(content: string): { role: Role; content: string }[] {
  return [{ role: Role.ROLE_USER, content }];
}

async function next(iterator: AsyncIterator<StreamEvent>): Promise<StreamEvent | null> {
  const result = await iterator.next();
  return result.done ? null : result.value;
}

/** The prompt of `--prompt-words` words, else "Say hi". */
function promptOf(args: Args): string {
  return args.promptWords > 0 ? "word ".repeat(args.promptWords) : "Say hi";
}

async function complete(client: GatewayClient, args: Args): Promise<Json> {
  const { response, attempts } = await client.complete(
    { model: args.model, messages: messages(promptOf(args)) },
    { timeoutMs: CALL_GUARD_MS },
  );
  return { content: response.content, attempts, metadata: metadataJson(response.metadata!) };
}

async function longAnswer(client: GatewayClient, args: Args): Promise<Json> {
  // An answer over gRPC's default 4 MiB message: its length, not its text.
  const { response } = await client.complete(
    { model: args.model, messages: messages("Say it all") },
    { timeoutMs: CALL_GUARD_MS },
  );
  return { length: response.content.length, start: response.content.slice(0, 10) };
}

async function tryComplete(client: GatewayClient, args: Args): Promise<Json> {
  // A call that may fail (a TLS handshake refused): its answer, or how it failed.
  try {
    return await complete(client, args);
  } catch (error) {
    return errorJson(error);
  }
}

async function reasoningEffort(client: GatewayClient, args: Args): Promise<Json> {
  const { response } = await client.complete(
    {
      model: args.model,
      messages: messages("Say hi"),
      params: { reasoningEffort: ReasoningEffort.REASONING_EFFORT_LOW },
    },
    { timeoutMs: CALL_GUARD_MS },
  );
  return { content: response.content };
}

async function stream(client: GatewayClient, args: Args): Promise<Json> {
  const started = performance.now();
  const deltas: { content: string; atMs: number }[] = [];
  let final: Json | null = null;
  for await (const event of client.completeStream(
    { model: args.model, messages: messages("Say hi") },
    { timeoutMs: CALL_GUARD_MS },
  )) {
    if (event.kind === "delta") {
      deltas.push({ content: event.content, atMs: performance.now() - started });
    } else {
      final = metadataJson(event.metadata);
    }
  }
  return { deltas, final };
}

async function streamTools(client: GatewayClient, args: Args): Promise<Json> {
  // A reasoning model calling tools: the reasoning and the calls, assembled by the stream.
  const events = client.completeStream(
    {
      model: args.model,
      messages: messages("Weather in Paris?"),
      tools: [{ name: "get_weather", description: "", parameters: '{"type": "object"}' }],
    },
    { timeoutMs: CALL_GUARD_MS },
  );
  const pieces: number[] = [];
  for await (const event of events) {
    if (event.kind === "delta") {
      pieces.push(event.toolCalls.length);
    }
  }
  return { reasoning: events.reasoning, toolCalls: events.toolCalls, pieces };
}

async function invalid(client: GatewayClient, args: Args): Promise<Json> {
  try {
    // Two invalid fields at once: the gateway reports every violation, not just the first.
    await client.complete({
      model: args.model,
      messages: [{ role: Role.ROLE_USER, content: "   " }],
      params: { temperature: 9 },
    });
  } catch (error) {
    return errorJson(error);
  }
  return { unexpected: "the invalid request succeeded" };
}

async function overloadRecovers(client: GatewayClient, args: Args): Promise<Json> {
  // A slow stream takes the gateway's only call slot; once its first delta is here the
  // slot is certainly held, so the unary call below is refused with RESOURCE_EXHAUSTED and
  // the channel's retry policy must wait out the pushback until the stream ends.
  const hold: CompletionStream = client.completeStream({
    model: args.model,
    messages: messages("hold the slot"),
  });
  const holdEvents = hold[Symbol.asyncIterator]();
  const first = await next(holdEvents);
  const started = performance.now();
  const { response, attempts } = await client.complete(
    { model: args.model, messages: messages(promptOf(args)) },
    { timeoutMs: CALL_GUARD_MS },
  );
  const elapsedMs = performance.now() - started;
  while ((await next(holdEvents)) !== null) {
    // Drain the holding stream so it ends cleanly.
  }
  return { holdFirstEvent: first?.kind, content: response.content, attempts, elapsedMs };
}

async function overloadExhausted(client: GatewayClient, args: Args): Promise<Json> {
  // The test holds the only slot for the whole call: every attempt is refused.
  const started = performance.now();
  try {
    await client.complete(
      { model: args.model, messages: messages("Say hi") },
      { timeoutMs: CALL_GUARD_MS },
    );
  } catch (error) {
    return { ...errorJson(error), elapsedMs: performance.now() - started };
  }
  return { unexpected: "the call succeeded while the gateway was full" };
}

async function cancel(client: GatewayClient, args: Args): Promise<Json> {
  const call = client.completeStream({ model: args.model, messages: messages("Say hi") });
  const events = call[Symbol.asyncIterator]();
  const first = await next(events);
  call.cancel();
  try {
    await next(events);
  } catch (error) {
    return { firstEvent: first?.kind, afterCancel: errorJson(error).code };
  }
  return { firstEvent: first?.kind, afterCancel: "no error" };
}

/** Resolves with the first line this process reads on stdin: the test's go-ahead. */
function lineFromTest(): Promise<void> {
  return new Promise((resolve) => process.stdin.once("data", () => resolve()));
}

async function abortComplete(client: GatewayClient, args: Args): Promise<Json> {
  // A unary call aborted by its signal once the test says the upstream has the request.
  const controller = new AbortController();
  const answer = client.complete(
    { model: args.model, messages: messages("Say hi") },
    { timeoutMs: CALL_GUARD_MS, signal: controller.signal },
  );
  void lineFromTest().then(() => controller.abort());
  try {
    await answer;
  } catch (error) {
    return errorJson(error);
  } finally {
    process.stdin.destroy();
  }
  return { unexpected: "the aborted call succeeded" };
}

async function closeInFlight(client: GatewayClient, args: Args): Promise<Json> {
  // A call of each kind in flight (and a stream never read) when the test says the upstream
  // has them all: `close()` cuts them, and this process ends without waiting out any.
  const request = { model: args.model, messages: messages("Say hi") };
  const options = { timeoutMs: CALL_GUARD_MS };
  const outcome = (run: () => Promise<unknown>): Promise<Json> =>
    run().then(
      () => ({ unexpected: "the call succeeded" }),
      (error: unknown) => ({ code: errorJson(error).code, message: errorJson(error).message }),
    );
  const readAll = async (events: AsyncIterable<unknown>): Promise<void> => {
    for await (const _ of events) {
      // read on
    }
  };
  client.completeStream(request, options); // never read
  const outcomes = Promise.all([
    outcome(() => client.complete(request, options)),
    outcome(() => readAll(client.completeStream(request, options))),
    outcome(() => readAll(client.completeBatch({ items: [{ id: "q1", request }] }, options))),
  ]);
  await lineFromTest();
  process.stdin.destroy();
  client.close();
  const [complete, stream, batch] = await outcomes;
  return { complete, stream, batch };
}

async function abortedBeforeComplete(client: GatewayClient, args: Args): Promise<Json> {
  // A signal aborted before the call: it fails at once, the gateway never called.
  const controller = new AbortController();
  controller.abort();
  try {
    await client.complete(
      { model: args.model, messages: messages("Say hi") },
      { timeoutMs: CALL_GUARD_MS, signal: controller.signal },
    );
  } catch (error) {
    return errorJson(error);
  }
  return { unexpected: "the aborted call succeeded" };
}

async function abortStream(client: GatewayClient, args: Args): Promise<Json> {
  // As `cancel`, by the stream's signal.
  const controller = new AbortController();
  const call = client.completeStream(
    { model: args.model, messages: messages("Say hi") },
    { signal: controller.signal },
  );
  const events = call[Symbol.asyncIterator]();
  const first = await next(events);
  controller.abort();
  try {
    await next(events);
  } catch (error) {
    return { firstEvent: first?.kind, afterCancel: errorJson(error).code };
  }
  return { firstEvent: first?.kind, afterCancel: "no error" };
}

async function stalledStream(client: GatewayClient, args: Args): Promise<Json> {
  // Reads one event, then nothing until the test's go-ahead, then the rest.
  const call = client.completeStream({ model: args.model, messages: messages("long") });
  const events = call[Symbol.asyncIterator]();
  let chars = 0;
  let event = await next(events);
  await lineFromTest();
  process.stdin.destroy();
  try {
    for (; event !== null; event = await next(events)) {
      chars += event.kind === "delta" ? event.content.length : 0;
    }
  } catch (error) {
    return { ...errorJson(error), chars };
  }
  return { code: "OK", chars };
}

/** Leave `stream`, read through `events`, as `how` says. */
async function leave(
  how: string,
  stream: CompletionStream,
  events: AsyncIterator<StreamEvent>,
  controller: AbortController,
): Promise<void> {
  switch (how) {
    case "cancel":
      stream.cancel();
      break;
    case "abort":
      controller.abort();
      break;
    case "return":
      await events.return?.();
      break;
    case "return-unstarted":
      // Another loop's iterator, left before its first event.
      await stream[Symbol.asyncIterator]().return?.();
      break;
    case "break":
      for await (const _ of stream) {
        break;
      }
      break;
    default:
      throw new Error(`unknown --leave ${how}`);
  }
}

async function leaveBuffered(client: GatewayClient, args: Args): Promise<Json> {
  // A slow reader: one event, then none until the call has ended, every message of it
  // received; then it leaves the stream (--leave) and reads on, with the same iterator
  // and then a loop of its own.
  const call = client.stub.completeStream(
    CompleteStreamRequest.fromPartial({ model: args.model, messages: messages("Say hi") }),
    new grpc.Metadata(),
    { deadline: Date.now() + CALL_GUARD_MS },
  );
  const ended = new Promise((resolve) => call.on("status", resolve));
  const controller = new AbortController();
  const stream = new CompletionStream(call, controller.signal);
  const events = stream[Symbol.asyncIterator]();
  const first = await next(events);
  await ended;
  await leave(args.leave, stream, events, controller);
  const after: string[] = [];
  const outcome = await outcomeOf(async () => {
    for (let event = await next(events); event !== null; event = await next(events)) {
      after.push(event.kind);
    }
    for await (const event of stream) {
      after.push(event.kind);
    }
  });
  return { firstEvent: first?.kind, after, outcome: outcome === "answered" ? "ended" : outcome };
}

async function lateStream(client: GatewayClient, args: Args): Promise<Json> {
  // A stream read only after its call has failed (here: a model no upstream serves).
  return await readAfterItsStatus(client, `${args.model}-unknown`);
}

async function lateCutStream(client: GatewayClient, args: Args): Promise<Json> {
  // A stream read only after its call has failed mid-answer (the test's upstream cuts it).
  return await readAfterItsStatus(client, args.model);
}

/** The events and failure of a stream of `model` read only once its call has ended. */
async function readAfterItsStatus(client: GatewayClient, model: string): Promise<Json> {
  // The call made as completeStream makes it, kept here to wait for its status.
  const call = client.stub.completeStream(
    CompleteStreamRequest.fromPartial({ model, messages: messages("Say hi") }),
    new grpc.Metadata(),
    { deadline: Date.now() + CALL_GUARD_MS },
  );
  const stream = new CompletionStream(call);
  // Not events.once: it would take the call's 'error' event for itself.
  await new Promise((resolve) => call.on("status", resolve));
  const kinds: string[] = [];
  let content = "";
  try {
    for await (const event of stream) {
      kinds.push(event.kind);
      content += event.kind === "delta" ? event.content : "";
    }
  } catch (error) {
    return { ...errorJson(error), kinds, content };
  }
  return { unexpected: "the stream ended without its error", kinds, content };
}

async function withoutTimeout(client: GatewayClient, args: Args): Promise<Json> {
  // No per-call timeout: the client's default deadline must end a call the upstream hangs.
  const started = performance.now();
  try {
    await client.complete({ model: args.model, messages: messages("Say hi") });
  } catch (error) {
    return { ...errorJson(error), elapsedMs: performance.now() - started };
  }
  return { unexpected: "the call succeeded" };
}

/** How a call ended: "answered", a refused call's status name, or what else it threw. */
async function outcomeOf(call: () => Promise<unknown>): Promise<string> {
  try {
    await call();
    return "answered";
  } catch (error) {
    return error instanceof GatewayCallError
      ? error.codeName
      : `${(error as Error).name}: ${(error as Error).message}`;
  }
}

async function timedCalls(client: GatewayClient, args: Args): Promise<Json> {
  // A unary and a streamed call, each with its own timeoutMs (--timeout-ms).
  const request = { model: args.model, messages: messages("Say hi") };
  const options = { timeoutMs: args.timeoutMs as number };
  return {
    complete: await outcomeOf(() => client.complete(request, options)),
    stream: await outcomeOf(async () => {
      let events = 0;
      for await (const event of client.completeStream(request, options)) {
        events += event.kind === "final" ? 1 : 0;
      }
      return events;
    }),
  };
}

/**
 * Requests whose fields their types cannot hold (or that are no request): each refused by
 * `complete` and by `completeStream` before any call, with what each threw.
 */
const BAD_REQUESTS: Record<string, (request: Json) => unknown> = {
  "max-tokens-past-int32": (request) => ({ ...request, params: { maxTokens: 2 ** 32 + 16 } }),
  "max-tokens-fraction": (request) => ({ ...request, params: { maxTokens: 1.5 } }),
  "max-tokens-string": (request) => ({ ...request, params: { maxTokens: "5" } }),
  "ttl-negative": (request) => ({ ...request, cache: { ttlSeconds: -1 } }),
  "seed-past-2-53": (request) => ({ ...request, params: { seed: 2 ** 70 } }),
  "role-name": (request) => ({ ...request, messages: [{ role: "user", content: "Say hi" }] }),
  "effort-name": (request) => ({ ...request, params: { reasoningEffort: "low" } }),
  "temperature-string": (request) => ({ ...request, params: { temperature: "0.5" } }),
  "strict-string": (request) => ({
    ...request,
    params: { responseFormat: { type: 2, strict: "yes" } },
  }),
  "content-number": (request) => ({ ...request, messages: [{ role: Role.ROLE_USER, content: 5 }] }),
  "label-number": (request) => ({ ...request, labels: { team: 5 } }),
  // A map field's natural JavaScript type, whose entries are no properties.
  "labels-map": (request) => ({ ...request, labels: new Map([["team", "search"]]) }),
  "stop-string": (request) => ({ ...request, params: { stop: "END" } }),
  "params-number": (request) => ({ ...request, params: 5 }),
  "message-null": (request) => ({ ...request, messages: [null] }),
  // Lists with a hole, as a stray comma writes them.
  "message-hole": (request) => ({ ...request, messages: [, ...(request.messages as Json[])] }),
  "stop-hole": (request) => ({ ...request, params: { stop: ["END", , "STOP"] } }),
  "max-tokens-snake-case": (request) => ({ ...request, params: { max_tokens: 5 } }),
  "unknown-field": (request) => ({ ...request, maxTokens: 5 }),
  undefined: () => undefined,
  null: () => null,
};

/** Calls whose options (not their request) the client cannot take. */
const BAD_OPTIONS: Record<string, unknown> = {
  null: null,
  number: 500,
  "metadata-object": { metadata: { authorization: "Bearer x" } },
  "signal-object": { signal: { aborted: false } },
  "timeout-snake-case": { timeout_ms: 500 },
  deadline: { deadline: 500 },
};

/** Client options the client cannot take, as a caller might mistype them. */
const BAD_CLIENT_OPTIONS: Record<string, unknown> = {
  "api-key-snake-case": { api_key: "llmgw_key_under_a_wrong_name" },
  "default-timeout": { defaultTimeout: 500 },
  "tls-string": { tls: "ca.pem" },
  "tls-snake-case": { tls: { ca_file: "ca.pem" } },
  "api-key-number": { apiKey: 42 },
  "api-key-object": { apiKey: { key: "llmgw_key_under_a_wrong_name" } },
  "api-key-buffer": { apiKey: Buffer.from("llmgw_key_under_a_wrong_name") },
  "api-key-boolean": { apiKey: true },
  "api-key-carriage-return": { apiKey: "llmgw_key_under_a_wrong_name\r" },
  "api-key-nul": { apiKey: "llmgw_key_under_a_wrong_name\0" },
};

async function badClientOptions(_client: GatewayClient, args: Args): Promise<Json> {
  // Each client made with options it cannot take: what it threw ("answered": made).
  const refused: Json = {};
  for (const [name, options] of Object.entries(BAD_CLIENT_OPTIONS)) {
    refused[name] = await outcomeOf(async () =>
      new GatewayClient(args.address, options as GatewayClientOptions).close(),
    );
  }
  return refused;
}

async function badArguments(client: GatewayClient, args: Args): Promise<Json> {
  const request = { model: args.model, messages: messages("Say hi") };
  // As a JavaScript caller, or a TypeScript one casting, would give them.
  const complete = client.complete.bind(client) as (...given: unknown[]) => Promise<unknown>;
  const stream = client.completeStream.bind(client) as (...given: unknown[]) => CompletionStream;
  const requests: Json = {};
  for (const [name, bad] of Object.entries(BAD_REQUESTS)) {
    requests[name] = {
      complete: await outcomeOf(() => complete(bad(request))),
      stream: await outcomeOf(async () => {
        for await (const _ of stream(bad(request))) {
          // refused before its first event, or read to its end
        }
      }),
    };
  }
  const options: Json = {};
  for (const [name, bad] of Object.entries(BAD_OPTIONS)) {
    options[name] = {
      complete: await outcomeOf(() => complete(request, bad)),
      stream: await outcomeOf(async () => {
        for await (const _ of stream(request, bad)) {
          // refused before its first event, or read to its end
        }
      }),
    };
  }
  return { requests, options };
}

async function edgeArguments(client: GatewayClient, args: Args): Promise<Json> {
  // The widest values each field's type holds, and null for fields left unset: each sent,
  // for the gateway to judge.
  const request = { model: args.model, messages: messages("Say hi") };
  const widest = {
    model: args.model,
    messages: [{ role: Role.ROLE_USER, content: "Say hi", toolCalls: null }],
    params: { seed: 2n ** 63n - 1n, temperature: null },
    cache: { ttlSeconds: 2 ** 32 - 1 },
    labels: null,
  } as unknown as CompleteRequest;
  return {
    widest: await outcomeOf(() => client.complete(widest)),
    "max-int32": await outcomeOf(() =>
      client.complete({ ...request, params: { maxTokens: 2 ** 31 - 1 } }),
    ),
    "min-safe-seed": await outcomeOf(() =>
      client.complete({ ...request, params: { seed: Number.MIN_SAFE_INTEGER } }),
    ),
  };
}

/** A batch event as JSON: an item's answer or decoded failure, or the summary. */
function batchEventJson(event: BatchEvent): Json {
  switch (event.kind) {
    case "response": {
      const { kind, id, index, response } = event;
      return { kind, id, index, content: response.content };
    }
    case "error":
      return { kind: event.kind, id: event.id, index: event.index, error: event.error };
    case "summary": {
      const { succeeded, failed, usage, costUsd } = event.summary;
      const tokens = [usage?.inputTokens, usage?.outputTokens];
      return { kind: event.kind, succeeded, failed, tokens, costUsd };
    }
  }
}

/** Batch items of `args.model`, one a prompt, with ids "0", "1", ... */
function batchItems(args: Args, count: number): { id: string; request: Json }[] {
  return Array.from({ length: count }, (_, index) => ({
    id: String(index),
    request: { model: args.model, messages: messages(`Question ${index}`) },
  }));
}

async function batch(client: GatewayClient, args: Args): Promise<Json> {
  // A good item and one the gateway refuses (temperature 9), one at a time, in order.
  const [good] = batchItems(args, 1);
  const refused = {
    id: "hot",
    request: { model: args.model, messages: messages("Say hi"), params: { temperature: 9 } },
  };
  const events: Json[] = [];
  for await (const event of client.completeBatch(
    { items: [good, refused], concurrency: 1 },
    { timeoutMs: CALL_GUARD_MS },
  )) {
    events.push(batchEventJson(event));
  }
  return { events };
}

async function batchRefused(client: GatewayClient, args: Args): Promise<Json> {
  // More items than the test's gateway takes (batch.max_items): the call fails whole.
  const events: Json[] = [];
  try {
    for await (const event of client.completeBatch({ items: batchItems(args, 3) })) {
      events.push(batchEventJson(event));
    }
  } catch (error) {
    return { ...errorJson(error), events };
  }
  return { unexpected: "the batch ran", events };
}

/**
 * Read a batch's first event, wait for the test's go-ahead (the next item is at the
 * upstream), then leave it as `how` says: the first event, and how leaving ended.
 */
async function readOneAndLeave(
  how: string,
  results: BatchResults,
  controller: AbortController,
): Promise<{ first: Json | null; left: string }> {
  let first: Json | null = null;
  const goAhead = async (event: BatchEvent): Promise<void> => {
    first = batchEventJson(event);
    await lineFromTest();
    process.stdin.destroy();
  };
  const left = await outcomeOf(async () => {
    if (how === "return") {
      const events = results[Symbol.asyncIterator]();
      const { value } = await events.next();
      await goAhead(value as BatchEvent);
      await events.return?.();
      return;
    }
    for await (const event of results) {
      await goAhead(event);
      if (how === "break") {
        break;
      } else if (how === "throw") {
        throw new Error("the caller's own");
      } else if (how === "cancel") {
        results.cancel();
      } else if (how === "abort") {
        controller.abort();
      } else {
        throw new Error(`unknown --leave ${how}`);
      }
    }
  });
  return { first, left };
}

async function leaveBatch(client: GatewayClient, args: Args): Promise<Json> {
  // Three items one at a time; the batch is left (--leave) while the second runs, then
  // read on by a new loop.
  const controller = new AbortController();
  const results = client.completeBatch(
    { items: batchItems(args, 3), concurrency: 1 },
    { timeoutMs: CALL_GUARD_MS, signal: controller.signal },
  );
  const { first, left } = await readOneAndLeave(args.leave, results, controller);
  const after: string[] = [];
  const outcome = await outcomeOf(async () => {
    for await (const event of results) {
      after.push(event.kind);
    }
  });
  return { first, left, after, outcome };
}

/** How `events` ended when read to its end, and then when read again. */
async function readTwice(events: AsyncIterable<unknown>): Promise<Json> {
  const first = await outcomeOf(async () => {
    for await (const _ of events) {
      // read to its end
    }
  });
  let eventsAgain = 0;
  const again = await outcomeOf(async () => {
    for await (const _ of events) {
      eventsAgain += 1;
    }
  });
  return { first, again, eventsAgain };
}

async function readAgain(client: GatewayClient, args: Args): Promise<Json> {
  // A stream, a batch and a failed stream (a model no upstream serves), each read twice.
  const request = { model: args.model, messages: messages("Say hi") };
  const unknown = { ...request, model: `${args.model}-unknown` };
  return {
    stream: await readTwice(client.completeStream(request, { timeoutMs: CALL_GUARD_MS })),
    batch: await readTwice(client.completeBatch({ items: batchItems(args, 1) })),
    failed: await readTwice(client.completeStream(unknown, { timeoutMs: CALL_GUARD_MS })),
  };
}

/** The events each of two loops begun together over `events` read, and how each ended. */
async function readByTwoLoops(events: AsyncIterable<{ kind: string }>): Promise<Json> {
  const loop = async (): Promise<Json> => {
    const kinds: string[] = [];
    const outcome = await outcomeOf(async () => {
      for await (const event of events) {
        kinds.push(event.kind);
      }
    });
    return { kinds, outcome };
  };
  const [first, second] = await Promise.all([loop(), loop()]);
  return { first, second };
}

/** The first event read on an iterator of its own, then the rest by a loop. */
async function peekThenLoop(events: AsyncIterable<{ kind: string }>): Promise<Json> {
  const peeked = await events[Symbol.asyncIterator]().next();
  const kinds = peeked.done ? [] : [peeked.value.kind];
  const outcome = await outcomeOf(async () => {
    for await (const event of events) {
      kinds.push(event.kind);
    }
  });
  return { kinds, outcome };
}

async function readByTwo(client: GatewayClient, args: Args): Promise<Json> {
  // A stream and a batch each read by two loops at once; a stream peeked, then read.
  const request = { model: args.model, messages: messages("Say hi") };
  const options = { timeoutMs: CALL_GUARD_MS };
  return {
    stream: await readByTwoLoops(client.completeStream(request, options)),
    batch: await readByTwoLoops(client.completeBatch({ items: batchItems(args, 1) }, options)),
    peeked: await peekThenLoop(client.completeStream(request, options)),
  };
}

async function summarize(client: GatewayClient, args: Args): Promise<Json> {
  try {
    const response = await client.summarize(
      { model: args.model, document: "A short document to summarise.", targetTokens: 64 },
      { timeoutMs: CALL_GUARD_MS },
    );
    const { summary, chunks, levels, usage, costUsd, upstreamCalls } = response;
    const tokens = [usage?.inputTokens, usage?.outputTokens];
    return {
      summary,
      chunks,
      levels,
      tokens,
      costUsd,
      upstreamCalls,
      finishReason: finishReasonToJSON(response.finishReason),
    };
  } catch (error) {
    return errorJson(error);
  }
}

async function usagePages(client: GatewayClient): Promise<Json> {
  // Pages of two rows, the total on each; then a negative page size and a bad token.
  const pages: string[][] = [];
  const totals: number[] = [];
  for await (const page of client.usagePages({ pageSize: 2 }, { timeoutMs: CALL_GUARD_MS })) {
    pages.push(page.rows.map((row) => row.labels.request_id ?? ""));
    totals.push(page.total?.requests ?? -1);
  }
  const first = await client.getUsage({ pageSize: 2 });
  const resumed: string[][] = [];
  for await (const page of client.usagePages({ pageSize: 3, pageToken: first.nextPageToken })) {
    resumed.push(page.rows.map((row) => row.labels.request_id ?? ""));
  }
  return {
    pages,
    totals,
    resumed,
    negative: await refusedFields(() => client.getUsage({ pageSize: -1 })),
    foreign: await refusedFields(() =>
      client.getUsage({ model: "other-model", pageToken: first.nextPageToken }),
    ),
    notInt32: await outcomeOf(() => client.getUsage({ pageSize: 1.5 })),
    // JavaScript's own types for a time and a map: a Timestamp and an object are taken.
    startDate: await outcomeOf(() =>
      client.getUsage({ startTime: new Date() } as unknown as GetUsageRequest),
    ),
    labelsMap: await outcomeOf(() =>
      client.getUsage({ labels: new Map([["request_id", "r0"]]) } as unknown as GetUsageRequest),
    ),
  };
}

async function usageSavings(client: GatewayClient): Promise<Json> {
  // Each row's requests, cache hits and savings, and the total's.
  const { rows, total } = await client.getUsage({});
  const summed = (row: UsageRow | undefined) => [row?.requests, row?.cacheHits, row?.savedCostUsd];
  return { rows: rows.map(summed), total: summed(total) };
}

/** The code and the fields the BadRequest names of a call that fails; else its outcome. */
async function refusedFields(call: () => Promise<unknown>): Promise<Json | string> {
  try {
    await call();
    return "answered";
  } catch (error) {
    const { code, details } = errorJson(error);
    return { code, fields: (details as StatusDetails).fieldViolations.map((v) => v.field) };
  }
}

async function timedBatchAndSummary(client: GatewayClient, args: Args): Promise<Json> {
  // A batch of one item and a summary, each with --timeout-ms, or the client's default.
  const options =
    args.timeoutMs === undefined ? undefined : { timeoutMs: args.timeoutMs as number };
  const events: string[] = [];
  return {
    batch: await outcomeOf(async () => {
      for await (const event of client.completeBatch({ items: batchItems(args, 1) }, options)) {
        events.push(event.kind === "error" ? event.error.codeName : event.kind);
      }
    }),
    events,
    summarize: await outcomeOf(() =>
      client.summarize({ model: args.model, document: "A short document." }, options),
    ),
  };
}

/** Batch requests the client refuses before any call. */
const BAD_BATCHES: Record<string, (item: Json) => unknown> = {
  "item-max-tokens-fraction": (item) => ({
    items: [{ ...item, request: { ...(item.request as Json), params: { maxTokens: 1.5 } } }],
  }),
  "item-snake-case": (item) => ({
    items: [{ ...item, request: { ...(item.request as Json), idempotency_key: "k" } }],
  }),
  "concurrency-negative": (item) => ({ items: [item], concurrency: -1 }),
  "items-object": (item) => ({ items: item }),
  undefined: () => undefined,
};

/** Summarize requests the client refuses before any call. */
const BAD_SUMMARIES: Record<string, (request: Json) => unknown> = {
  "target-tokens-negative": (request) => ({ ...request, targetTokens: -1 }),
  "target-tokens-snake-case": (request) => ({ ...request, target_tokens: 64 }),
  "document-number": (request) => ({ ...request, document: 5 }),
  "effort-name": (request) => ({ ...request, reasoningEffort: "low" }),
  undefined: () => undefined,
};

async function badBatchAndSummary(client: GatewayClient, args: Args): Promise<Json> {
  // As a JavaScript caller, or a TypeScript one casting, would give them.
  const completeBatch = client.completeBatch.bind(client) as (...given: unknown[]) => BatchResults;
  const summarizeAny = client.summarize.bind(client) as (...given: unknown[]) => Promise<unknown>;
  const [item] = batchItems(args, 1);
  const readAll = async (...given: unknown[]): Promise<void> => {
    for await (const _ of completeBatch(...given)) {
      // refused before its first event, or read to its end
    }
  };
  const batches: Json = {};
  for (const [name, bad] of Object.entries(BAD_BATCHES)) {
    batches[name] = await outcomeOf(() => readAll(bad(item)));
  }
  const document = { model: args.model, document: "A short document." };
  const summaries: Json = {};
  for (const [name, bad] of Object.entries(BAD_SUMMARIES)) {
    summaries[name] = await outcomeOf(() => summarizeAny(bad(document)));
  }
  const options = {
    batch: await outcomeOf(() => readAll({ items: [item] }, null)),
    summarize: await outcomeOf(() => summarizeAny(document, null)),
  };
  return { batches, summaries, options };
}

async function shown(client: GatewayClient, args: Args): Promise<Json> {
  // A keyed client as a log line or an error reporter would show it, after a call.
  const answer = await complete(client, args);
  return {
    content: answer.content,
    inspected: util.inspect(client, { depth: null, showHidden: true }),
    json: JSON.stringify(client),
  };
}

async function shownStream(client: GatewayClient, args: Args): Promise<Json> {
  // A keyed client's stream as an error reporter would show it, before and after its loop.
  const events = client.completeStream(
    { model: args.model, messages: messages("Say hi") },
    { timeoutMs: CALL_GUARD_MS },
  );
  const before = util.inspect(events, { depth: null, showHidden: true });
  let content = "";
  for await (const event of events) {
    if (event.kind === "delta") {
      content += event.content;
    }
  }
  return { content, before, after: util.inspect(events, { depth: null, showHidden: true }) };
}

async function listModels(client: GatewayClient): Promise<Json> {
  // Each model with its window and its upstreams' health; a refusal, its status name.
  try {
    const { models } = await client.listModels({ timeoutMs: CALL_GUARD_MS });
    return {
      models: models.map((model) => ({
        name: model.name,
        contextWindow: model.contextWindow,
        upstreams: model.upstreams.map((u) => [u.name, upstreamHealthToJSON(u.health)]),
      })),
    };
  } catch (error) {
    return errorJson(error);
  }
}

async function decode(args: Args): Promise<Json> {
  const status = Buffer.from(args.statusBase64, "base64");
  if (args.code === undefined) {
    return { details: decodeStatusDetails(status) };
  }
  // A call that failed with `code` and carried that status in its trailer, as grpc-js
  // hands it over.
  const metadata = new grpc.Metadata();
  metadata.set(STATUS_DETAILS_KEY, status);
  const error = Object.assign(new Error("call failed"), {
    code: args.code as grpc.status,
    details: "call failed",
    metadata,
  });
  return { details: new GatewayCallError(error).details };
}

const SCENARIOS: Record<string, (client: GatewayClient, args: Args) => Promise<Json>> = {
  complete,
  "try-complete": tryComplete,
  "long-answer": longAnswer,
  "reasoning-effort": reasoningEffort,
  stream,
  "stream-tools": streamTools,
  invalid,
  "overload-recovers": overloadRecovers,
  "overload-exhausted": overloadExhausted,
  cancel,
  "abort-stream": abortStream,
  "abort-complete": abortComplete,
  "aborted-before-complete": abortedBeforeComplete,
  "close-in-flight": closeInFlight,
  "stalled-stream": stalledStream,
  "leave-buffered": leaveBuffered,
  "late-stream": lateStream,
  "read-by-two": readByTwo,
  "late-cut-stream": lateCutStream,
  "read-again": readAgain,
  "without-timeout": withoutTimeout,
  "timed-calls": timedCalls,
  "bad-arguments": badArguments,
  "bad-client-options": badClientOptions,
  "edge-arguments": edgeArguments,
  shown,
  "shown-stream": shownStream,
  batch,
  "batch-refused": batchRefused,
  "leave-batch": leaveBatch,
  summarize,
  "timed-batch-and-summary": timedBatchAndSummary,
  "bad-batch-and-summary": badBatchAndSummary,
  "usage-pages": usagePages,
  "usage-savings": usageSavings,
  "list-models": listModels,
};

/**
 * What one scenario's command line (`argv`) saw, as its JSON line; `channelOptions` go to
 * its client, made for it alone and closed after it.
 */
async function answerOf(argv: string[], channelOptions?: grpc.ChannelOptions): Promise<Json> {
  if (argv[0] === "loopback") {
    // Each address given: whether the client calls it past the machine's proxy.
    const told = argv.slice(1).map((address) => [address, isLoopbackAddress(address)]);
    return Object.fromEntries(told);
  }
  if (argv[0] === "check-address") {
    // Each address given: what `checkAddress` refused it with, or null where it took it.
    const told = argv.slice(1).map((address) => [address, refusalOf(() => checkAddress(address))]);
    return Object.fromEntries(told);
  }
  const args = parseArgs(argv);
  if (args.scenario === "decode") {
    return await decode(args);
  }
  const run = SCENARIOS[args.scenario];
  if (run === undefined) {
    throw new Error(`unknown scenario ${args.scenario}`);
  }
  let client: GatewayClient;
  try {
    client = new GatewayClient(args.address, {
      apiKey: args.apiKey,
      defaultTimeoutMs: args.defaultTimeoutMs as number,
      tls: args.pemBytes && args.tls !== undefined ? asPemBytes(args.tls) : args.tls,
      channelOptions,
    });
  } catch (error) {
    // Options the client refuses (a certificate without its key): what it said.
    return { refused: (error as Error).message };
  }
  try {
    return await run(client, args);
  } finally {
    client.close();
  }
}

/** What `check` threw, as its class name and message, or null where it threw nothing. */
function refusalOf(check: () => void): string | null {
  try {
    check();
  } catch (error) {
    return `${(error as Error).name}: ${(error as Error).message}`;
  }
  return null;
}

/** Print `line` as one line of JSON; resolves once stdout has taken it. */
function print(line: Json): Promise<void> {
  return new Promise((resolve) => {
    process.stdout.write(`${JSON.stringify(line)}\n`, () => resolve());
  });
}

/**
 * `serve`: one scenario after another in this process, saving the test a Node start for
 * each: a JSON array of a scenario's arguments on each stdin line, its JSON line printed
 * back, or `{"crashed": STACK}` (as a scenario's own process exits 2). Each scenario's
 * client has connections of its own (a local subchannel pool), as in a process of its
 * own; anything thrown out of reach of a scenario (an unhandled rejection) is printed as
 * `crashed` and ends the process, as it would end a scenario's own.
 */
async function serve(): Promise<void> {
  const crash = (error: unknown): void => {
    void print({ crashed: util.inspect(error) }).then(() => process.exit(1));
  };
  process.on("uncaughtException", crash);
  process.on("unhandledRejection", crash);
  const ownConnections = { "grpc.use_local_subchannel_pool": 1 };
  for await (const line of readline.createInterface({ input: process.stdin })) {
    let answer: Json;
    try {
      answer = await answerOf(JSON.parse(line) as string[], ownConnections);
    } catch (error) {
      answer = { crashed: util.inspect(error) };
    }
    await print(answer);
  }
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  if (argv[0] === "serve") {
    await serve();
    return;
  }
  console.log(JSON.stringify(await answerOf(argv)));
}

main().catch((error: unknown) => {
  console.error(error);
  process.exit(2);
});
