/**
 * A small typed Node.js client for the LLM gateway.
 *
 * It wraps the @grpc/grpc-js stub that `make generate` writes to generated/ts (ts-proto),
 * loads the shared retry policy from clients/service_config.json, and turns a failed call
 * into a `GatewayCallError` whose `google.rpc.Status` details (BadRequest, RetryInfo,
 * QuotaFailure, ErrorInfo) are already decoded.
 *
 * @example
 *   const client = new GatewayClient("127.0.0.1:50051");
 *   const { response } = await client.complete({
 *     model: "deepseek-v4",
 *     messages: [{ role: Role.ROLE_USER, content: "Say hi" }],
 *   });
 *   console.log(response.content, response.metadata?.costUsd);
 *   client.close();
 */
import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { PassThrough, Readable } from "node:stream";

import * as grpc from "@grpc/grpc-js";

import { Any } from "../../../generated/ts/google/protobuf/any";
import { Duration } from "../../../generated/ts/google/protobuf/duration";
import {
  BadRequest,
  ErrorInfo,
  QuotaFailure,
  RetryInfo,
} from "../../../generated/ts/google/rpc/error_details";
import { Status } from "../../../generated/ts/google/rpc/status";
import {
  BatchSummary,
  CompleteBatchRequest,
  CompleteBatchResponse,
  CompleteRequest,
  CompleteResponse,
  CompleteStreamRequest,
  CompleteStreamResponse,
  CompletionMetadata,
  CompletionServiceClient,
  DeepPartial,
  Delta,
  GetUsageRequest,
  GetUsageResponse,
  ListModelsRequest,
  ListModelsResponse,
  SummarizeRequest,
  SummarizeResponse,
  ToolCall,
  ToolCallDelta,
} from "../../../generated/ts/llmgateway/v1/gateway";
import { checkRequest, kindOf } from "./requests";

export * from "../../../generated/ts/llmgateway/v1/gateway";
export { checkRequest } from "./requests";

/** Trailer carrying the full `google.rpc.Status`, details included (gRPC convention). */
export const STATUS_DETAILS_KEY = "grpc-status-details-bin";
/** Trailer the gateway sets on RESOURCE_EXHAUSTED; gRPC retry policies wait this long. */
export const RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms";
/**
 * Trailer the gateway sets, to "true", on a refusal of its replica's own (overloaded,
 * shutting down, at its own limit for every upstream of the model): another may take it.
 */
export const RETRY_ELSEWHERE_KEY = "llm-gateway-retry-elsewhere";
/** Set by grpc-js on the response (or error) of a call that was retried. */
export const PREVIOUS_ATTEMPTS_KEY = "grpc-previous-rpc-attempts";

/** One invalid request field, from a `google.rpc.BadRequest` detail. */
export interface FieldViolation {
  field: string;
  description: string;
}

/** One quota that refused the call, from a `google.rpc.QuotaFailure` detail. */
export interface QuotaViolation {
  subject: string;
  description: string;
}

/** Every `google.rpc.Status` detail the gateway sends, decoded. */
export interface StatusDetails {
  fieldViolations: FieldViolation[];
  quotaViolations: QuotaViolation[];
  /** From `RetryInfo.retry_delay`: milliseconds after which a retry may succeed. */
  retryDelayMs: number | null;
  errorInfo: { reason: string; domain: string; metadata: Record<string, string> } | null;
  /**
   * type URLs of details this client does not know (or whose bytes are not their type's),
   * kept so nothing is silently lost.
   */
  unknownTypeUrls: string[];
}

function durationMs(duration: Duration | undefined): number | null {
  if (duration === undefined) {
    return null;
  }
  return duration.seconds * 1000 + duration.nanos / 1e6;
}

/** A status that carries no details. */
function noDetails(): StatusDetails {
  return {
    fieldViolations: [],
    quotaViolations: [],
    retryDelayMs: null,
    errorInfo: null,
    unknownTypeUrls: [],
  };
}

/**
 * Decode the packed details of a serialized `google.rpc.Status`; with `code`, none when the
 * status is of another code (the call's own status wins over the trailer's).
 */
export function decodeStatusDetails(statusBytes: Uint8Array, code?: grpc.status): StatusDetails {
  const status = Status.decode(statusBytes);
  if (code !== undefined && status.code !== code) {
    // The call's deadline passed as the gateway sent its error, and gRPC's own
    // DEADLINE_EXCEEDED won: the gateway's details are of another status, not this one.
    return noDetails();
  }
  return statusDetails(status);
}

/**
 * Decode the details of a `google.rpc.Status`: a failed batch item's `error`, say, as
 * `GatewayCallError.details` holds a failed call's (Python's `status_details`).
 */
export function statusDetails(status: Status): StatusDetails {
  const details = noDetails();
  for (const packed of status.details) {
    try {
      decodeOne(packed, details);
    } catch {
      // A detail whose bytes are not its type's: kept by its type URL, as an unknown one.
      details.unknownTypeUrls.push(packed.typeUrl);
    }
  }
  return details;
}

/**
 * The details of the failed call's `grpc-status-details-bin` trailer, none when it is not
 * a `google.rpc.Status` (set by a proxy on the way, say): thrown from grpc-js's callback,
 * the decoding error ended the caller's process, and a stream's loop threw it in place of
 * the call's status.
 */
function trailerDetails(raw: Buffer, code: grpc.status): StatusDetails {
  try {
    return decodeStatusDetails(raw, code);
  } catch {
    return noDetails();
  }
}

function decodeOne(packed: Any, into: StatusDetails): void {
  // The type is the URL's last segment, whatever its host (google.protobuf.Any), as Python
  // and Go read it: one packed under another prefix went undecoded, an unknown type.
  const typeName = packed.typeUrl.slice(packed.typeUrl.lastIndexOf("/") + 1);
  switch (typeName) {
    case "google.rpc.BadRequest":
      for (const v of BadRequest.decode(packed.value).fieldViolations) {
        into.fieldViolations.push({ field: v.field, description: v.description });
      }
      break;
    case "google.rpc.QuotaFailure":
      for (const v of QuotaFailure.decode(packed.value).violations) {
        into.quotaViolations.push({ subject: v.subject, description: v.description });
      }
      break;
    case "google.rpc.RetryInfo":
      into.retryDelayMs = durationMs(RetryInfo.decode(packed.value).retryDelay);
      break;
    case "google.rpc.ErrorInfo": {
      const info = ErrorInfo.decode(packed.value);
      into.errorInfo = { reason: info.reason, domain: info.domain, metadata: info.metadata };
      break;
    }
    default:
      into.unknownTypeUrls.push(packed.typeUrl);
  }
}

function attemptsOf(metadata: grpc.Metadata | undefined): number {
  const previous = metadata?.get(PREVIOUS_ATTEMPTS_KEY)[0];
  return previous === undefined ? 1 : Number(previous) + 1;
}

/** A status code's name, e.g. `RESOURCE_EXHAUSTED` for 8. */
function codeNameOf(code: number): string {
  return grpc.status[code] ?? String(code);
}

/** A failed gateway call: the gRPC status plus its decoded `google.rpc` details. */
export class GatewayCallError extends Error {
  readonly code: grpc.status;
  /** The status name, e.g. `RESOURCE_EXHAUSTED`. */
  readonly codeName: string;
  readonly details: StatusDetails;
  /** The `grpc-retry-pushback-ms` trailer, when the server sent one. */
  readonly pushbackMs: number | null;
  /** Attempts the channel's retry policy made, the failed one included. */
  readonly attempts: number;
  /** The `llm-gateway-retry-elsewhere: true` trailer: another replica may take the call. */
  readonly retryElsewhere: boolean;

  constructor(error: grpc.ServiceError) {
    super(error.details || error.message);
    this.name = "GatewayCallError";
    this.code = error.code;
    this.codeName = codeNameOf(error.code);
    const metadata = error.metadata;
    const raw = metadata?.get(STATUS_DETAILS_KEY)[0];
    this.details = raw instanceof Buffer ? trailerDetails(raw, error.code) : noDetails();
    const pushback = metadata?.get(RETRY_PUSHBACK_KEY)[0];
    this.pushbackMs = pushback === undefined ? null : Number(pushback);
    this.attempts = attemptsOf(metadata);
    this.retryElsewhere = metadata?.get(RETRY_ELSEWHERE_KEY)[0] === "true";
  }
}

function isServiceError(error: unknown): error is grpc.ServiceError {
  return error instanceof Error && typeof (error as grpc.ServiceError).code === "number";
}

/** Turn whatever a call threw into a `GatewayCallError` when it is a gRPC status. */
export function asGatewayError(error: unknown): unknown {
  return isServiceError(error) ? new GatewayCallError(error) : error;
}

/** Find clients/service_config.json by walking up from this file (works from src or dist). */
export function defaultServiceConfigPath(start: string = __dirname): string {
  let dir = start;
  for (;;) {
    const candidate = path.join(dir, "clients", "service_config.json");
    if (fs.existsSync(candidate)) {
      return candidate;
    }
    const parent = path.dirname(dir);
    if (parent === dir) {
      throw new Error(`clients/service_config.json not found above ${start}`);
    }
    dir = parent;
  }
}

/** Channel options that install a gRPC service config (retry policy) on a channel. */
export function serviceConfigOptions(serviceConfigJson: string): grpc.ChannelOptions {
  // Parse once so a broken file fails here, loudly, rather than being ignored by the channel.
  JSON.parse(serviceConfigJson);
  return { "grpc.service_config": serviceConfigJson, "grpc.enable_retries": 1 };
}

/**
 * Refuse a name `given` (the `where` options, a `typeName`) has no option for, naming it but
 * not its value (an `api_key`'s is a key). Left unread, a typo went unnoticed: `timeout_ms`
 * left the call on the 5-minute default, `api_key` sent no key, `tls: { ca_file }`
 * verified the gateway against the system's CAs; the Python client's keywords refuse them.
 */
function checkOptionNames(
  given: object,
  known: readonly string[],
  typeName: string,
  where: string,
): void {
  const squashed = (name: string): string => name.replaceAll("_", "").toLowerCase();
  for (const name of Object.keys(given)) {
    if (!known.includes(name)) {
      const meant = known.find((each) => squashed(each) === squashed(name));
      const hint = meant === undefined ? "" : ` (the option is ${meant})`;
      throw new TypeError(`${where}.${name}: ${typeName} has no such option${hint}`);
    }
  }
}

/**
 * TLS to a gateway with `server.tls`. Each PEM is a file, or its bytes (from a secret
 * store, say): give one or the other. `{}` verifies the gateway against the system's CAs.
 */
export interface TlsOptions {
  /** The CA that signed the gateway's certificate; default: the system's CAs. */
  caFile?: string;
  ca?: Buffer;
  /** The client certificate, for mutual TLS; goes with a key. */
  certFile?: string;
  cert?: Buffer;
  /** The client certificate's private key (unencrypted PEM). */
  keyFile?: string;
  key?: Buffer;
}

/**
 * Where Linux distributions (and macOS) keep the system's CA bundle: the list Go's
 * crypto/x509 searches. Node cannot ask OpenSSL, its own being built with other paths.
 */
const SYSTEM_CA_BUNDLES = [
  "/etc/ssl/certs/ca-certificates.crt",
  "/etc/pki/tls/certs/ca-bundle.crt",
  "/etc/ssl/ca-bundle.pem",
  "/etc/pki/tls/cacert.pem",
  "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
  "/etc/ssl/cert.pem",
];

function readIfPresent(file: string | undefined): Buffer | null {
  if (!file) {
    return null;
  }
  try {
    return fs.readFileSync(file);
  } catch {
    return null;
  }
}

/**
 * The system's CA bundle (`$SSL_CERT_FILE`, else the distribution's), with
 * `$NODE_EXTRA_CA_CERTS` added; null when there is none.
 *
 * grpc-js does not read it: left to itself it trusts Node's built-in copy of Mozilla's
 * public roots, so a gateway whose private CA is installed on the system would fail. And
 * once the CAs are given, Node no longer adds `$NODE_EXTRA_CA_CERTS`, so that is added here.
 */
export function systemCaCertificates(): Buffer | null {
  return systemCaBundle()?.pem ?? null;
}

/** `systemCaCertificates`, and the file its bundle was read from, to name in errors. */
function systemCaBundle(): { file: string; pem: Buffer } | null {
  for (const file of [process.env.SSL_CERT_FILE, ...SYSTEM_CA_BUNDLES]) {
    const bundle = readIfPresent(file);
    if (file !== undefined && bundle !== null) {
      const extra = readIfPresent(process.env.NODE_EXTRA_CA_CERTS);
      const pem = extra === null ? bundle : Buffer.concat([bundle, Buffer.from("\n"), extra]);
      return { file, pem };
    }
  }
  return null;
}

/** Whether `pem` holds a PEM certificate (not only a key, nor DER bytes). */
function holdsCertificate(pem: Buffer): boolean {
  return pem.includes("-----BEGIN CERTIFICATE-----");
}

/**
 * The system's CAs, refused when their bundle holds no certificate (`$SSL_CERT_FILE`
 * naming a key, or a DER file), as the Python CLI refuses it: Node would take it and trust
 * nothing, and every handshake would blame the gateway's certificate.
 */
function checkedSystemCas(): Buffer | null {
  const bundle = systemCaBundle();
  if (bundle !== null && !holdsCertificate(bundle.pem)) {
    const where = bundle.file === process.env.SSL_CERT_FILE ? "$SSL_CERT_FILE " : "";
    throw new Error(
      `tls: the system's CA bundle, ${where}${bundle.file}, holds no PEM certificate to ` +
        "verify the gateway with (give caFile)",
    );
  }
  return bundle?.pem ?? null;
}

/** One PEM of `TlsOptions`: its bytes, its file read now, or null when neither is given. */
function pemOf(bytes: Buffer | undefined, file: string | undefined, name: string): Buffer | null {
  if (bytes !== undefined && file !== undefined) {
    throw new Error(`tls: give ${name} or ${name}File, not both`);
  }
  if (file === undefined) {
    return bytes ?? null;
  }
  try {
    return fs.readFileSync(file);
  } catch (error) {
    throw new Error(`tls.${name}File: cannot read ${file}: ${(error as Error).message}`);
  }
}

const TLS_OPTIONS: readonly (keyof TlsOptions)[] = [
  "caFile",
  "ca",
  "certFile",
  "cert",
  "keyFile",
  "key",
];

/** Channel credentials for TLS, or mutual TLS when a client certificate and key are given. */
export function tlsCredentials(tls: TlsOptions = {}): grpc.ChannelCredentials {
  if (typeof tls !== "object" || tls === null) {
    // `tls: "ca.pem"` verified the gateway against the system's CAs, not that one.
    throw new TypeError(`tls: expected an object (TlsOptions), got ${kindOf(tls)}`);
  }
  checkOptionNames(tls, TLS_OPTIONS, "TlsOptions", "tls");
  const ca = pemOf(tls.ca, tls.caFile, "ca");
  if (ca !== null && !holdsCertificate(ca)) {
    // Node would take it and trust nothing: every handshake would blame the gateway.
    throw new Error(`tls: no PEM certificate in ${tls.caFile ?? "ca"}`);
  }
  const cert = pemOf(tls.cert, tls.certFile, "cert");
  const key = pemOf(tls.key, tls.keyFile, "key");
  if ((cert === null) !== (key === null)) {
    throw new Error("tls: a client certificate and its key go together");
  }
  return grpc.credentials.createSsl(ca ?? checkedSystemCas(), key, cert);
}

export interface GatewayClientOptions {
  /** TLS (mutual with a client certificate); without it or `credentials`, plaintext. */
  tls?: TlsOptions;
  /**
   * Any grpc-js credentials, instead of `tls`. Defaults to insecure (plaintext), for
   * loopback and sidecar use.
   */
  credentials?: grpc.ChannelCredentials;
  /** Service config JSON; defaults to the shared clients/service_config.json. */
  serviceConfigJson?: string;
  /** Extra channel options, merged over the service config ones. */
  channelOptions?: grpc.ChannelOptions;
  /**
   * The caller key (`llmgw_...`), sent as `authorization: Bearer <key>` on every call; one
   * with anything but printable ASCII (a stray newline) throws when the client is made. An
   * empty one (an unset variable's) is none, as in the Python client: nothing is sent.
   */
  apiKey?: string;
  /**
   * Milliseconds a call may take when its own `timeoutMs` is not given; `null`: no
   * deadline. Defaults to 300 000 (5 minutes), as the Python client: a call without a
   * deadline waits as long as a hung upstream does.
   */
  defaultTimeoutMs?: number | null;
}

const CLIENT_OPTIONS: readonly (keyof GatewayClientOptions)[] = [
  "tls",
  "credentials",
  "serviceConfigJson",
  "channelOptions",
  "apiKey",
  "defaultTimeoutMs",
];

/** What a call waits at most when neither it nor its client says otherwise. */
export const DEFAULT_TIMEOUT_MS = 300_000;

/**
 * The longest timeout a call takes: 1e9 ms (11.5 days), as the Python client's 1e6 s.
 * Past about 3.6e14 ms (`Number.MAX_SAFE_INTEGER`, say) grpc-js throws from inside the
 * call, where no caller can catch it, and the process ends; nan failed the call at once.
 */
export const MAX_TIMEOUT_MS = 1_000_000_000;

/**
 * `timeoutMs` (`name` the option's), when a call can keep it; null is no deadline. One
 * already passed (0, negative) is kept, as in Python: the call fails DEADLINE_EXCEEDED.
 */
function checkedTimeoutMs(timeoutMs: unknown, name: string): number | null {
  if (timeoutMs !== null && typeof timeoutMs !== "number") {
    // A string ("500", from the environment) would reach grpc-js as "now" + "500", and
    // `true` as 1 ms: refused, as the Python client refuses all but numbers and None.
    throw new TypeError(`${name}: expected milliseconds or null, got ${typeof timeoutMs}`);
  }
  if (timeoutMs !== null && !(timeoutMs <= MAX_TIMEOUT_MS)) {
    // NaN fails the comparison too.
    throw new RangeError(
      `${name} must be at most ${MAX_TIMEOUT_MS} ms, or null for no deadline; got ${timeoutMs}`,
    );
  }
  return timeoutMs;
}

/**
 * The largest message the client takes. A unary answer, or a batch item's, is one message,
 * and the gateway takes upstream answers of up to 16 MiB: gRPC's default 4 MiB receive limit
 * would refuse the larger ones after they were paid for. `channelOptions` may set another.
 */
export const MAX_ANSWER_BYTES = 32 * 1024 * 1024;

/**
 * grpc-js retries a call only while its request fits the call's retry buffer, 1 MiB by
 * default: a longer prompt (a 300k-token document) would get the first pushback as its
 * answer. The buffer is the gateway's default `server.max_receive_message_bytes`, 4 MiB: a
 * request past it is refused in gRPC itself, RESOURCE_EXHAUSTED with no pushback, which the
 * retry policy would send again four times (a 10 MB document uploaded 50 MB, seconds of
 * backoff). grpc-js's buffer for all calls together stays at its default, 16 MiB.
 */
export const MAX_RETRIED_REQUEST_BYTES = 4 * 1024 * 1024;

export interface CallOptions {
  /**
   * Milliseconds the whole call may take, retries and pushback waits included; `null`: no
   * deadline. Left out, the client's `defaultTimeoutMs`.
   */
  timeoutMs?: number | null;
  metadata?: grpc.Metadata;
  /**
   * Cancels the call when it fires, as `CompletionStream.cancel()` does: the call fails
   * `CANCELLED` and the gateway closes the upstream request. One already aborted fails the
   * call at once (`complete` without sending it; a stream from its loop).
   */
  signal?: AbortSignal;
}

const CALL_OPTIONS: readonly (keyof CallOptions)[] = ["timeoutMs", "metadata", "signal"];

/**
 * `options` when it is what a call takes: an object (or nothing), its `metadata` one with
 * grpc-js's `Metadata` methods and its `signal` an `AbortSignal`'s. Without this, `null`
 * or a plain object threw "Cannot read properties of null (reading 'signal')" and alike.
 */
function checkedCallOptions(options: unknown): CallOptions {
  if (options === undefined) {
    return {};
  }
  if (typeof options !== "object" || options === null) {
    throw new TypeError(`options: expected an object (CallOptions), got ${kindOf(options)}`);
  }
  checkOptionNames(options, CALL_OPTIONS, "CallOptions", "options");
  const { metadata, signal } = options as CallOptions;
  // By their methods, not `instanceof`: a caller's own copy of grpc-js, or an AbortSignal
  // polyfill, makes objects of other classes that work as well. Null is none, as undefined.
  if (metadata != null && typeof metadata.clone !== "function") {
    throw new TypeError(`options.metadata: expected a grpc.Metadata, got ${kindOf(metadata)}`);
  }
  if (signal != null && typeof signal.addEventListener !== "function") {
    throw new TypeError(`options.signal: expected an AbortSignal, got ${kindOf(signal)}`);
  }
  return { ...(options as CallOptions), signal: signal ?? undefined };
}

/** What grpc-js says of a call cancelled on the client. */
const CANCELLED_ON_CLIENT = "Cancelled on client";
/** What a call cut by `GatewayClient.close()` says, as the Python client's. */
const CLIENT_CLOSED = "the client was closed while the call was in flight";

/**
 * The error of a call cancelled on the client, as grpc-js makes it: for a call whose
 * signal was aborted before it began, and a stream's loop after its cancel; with
 * `CLIENT_CLOSED`, of a call cut by `close()`.
 */
function cancelledOnClient(details: string = CANCELLED_ON_CLIENT): GatewayCallError {
  const error = Object.assign(new Error(`1 CANCELLED: ${details}`), {
    code: grpc.status.CANCELLED,
    details,
    metadata: new grpc.Metadata(),
  });
  return new GatewayCallError(error);
}

/** Cancel `call` when `signal` fires; the returned function stops listening. */
function cancelOnAbort(call: { cancel(): void }, signal: AbortSignal | undefined): () => void {
  if (signal === undefined) {
    return () => {};
  }
  const cancel = (): void => call.cancel();
  signal.addEventListener("abort", cancel, { once: true });
  // A long-lived signal (a request's, a server's) must not keep every finished call.
  return () => signal.removeEventListener("abort", cancel);
}

/** A generated unary method, given the call's metadata, options and callback. */
type SendUnary<Response> = (
  metadata: grpc.Metadata,
  options: Partial<grpc.CallOptions>,
  callback: (error: grpc.ServiceError | null, response: Response) => void,
) => grpc.ClientUnaryCall;

/** A unary answer and how many attempts the retry policy needed for it. */
export interface CompleteResult {
  response: CompleteResponse;
  attempts: number;
}

/**
 * The events of a server-streaming call, each message read as it arrives: iterate them, or
 * cancel the call. Leaving the loop early (break, an exception in its body, `return()` on
 * its iterator) cancels the call; a failed call throws `GatewayCallError` from the loop.
 */
abstract class CallEvents<Message, Event> implements AsyncIterable<Event> {
  /** The call's failure: rethrown once the loop has read every message before it. */
  private failure: unknown = null;
  /** Set by `cancel()`, the signal, or a loop left early: the loop reads nothing more. */
  #isCancelled = false;
  /** What the loop's CANCELLED says: set apart by the client's `close()`. */
  #cancelDetails = CANCELLED_ON_CLIENT;
  /** Set once a loop has read the call's every event: a later loop has none to read. */
  #isReadToEnd = false;
  /** Set while a loop waits for the next event: another loop's would take some of them. */
  #isAwaitingEvent = false;
  // A `#` field, as the client's key: util.inspect of the stream would otherwise show the
  // call, and in it the metadata the call was sent with, the caller key included.
  readonly #call: grpc.ClientReadableStream<Message>;
  /** Every message of the call, read as it arrives, for the loop to take in its own time. */
  readonly #received: PassThrough;
  readonly #signal: AbortSignal | undefined;

  constructor(call: grpc.ClientReadableStream<Message>, signal?: AbortSignal) {
    this.#call = call;
    this.#signal = signal;
    // grpc-js emits a failed status as an 'error' event: with no listener yet (a stream not
    // iterated at once) that would crash the process, and the loop read later would then
    // end as though the stream had succeeded.
    call.on("error", (error: unknown) => {
      this.failure = error;
    });
    // grpc-js ends a failed call at once, dropping the messages it received that nobody
    // had read yet: the text before the failure, for a loop begun after it, was lost. So
    // they go through this buffer, which the call ends only after the last of them. Its
    // default bound keeps gRPC's flow control: a caller that stops reading stalls the
    // stream, as the gateway's `stalled_stream_timeout_s` needs to close its upstream
    // request, where an unbounded one read (and had generated) the whole answer.
    this.#received = call.pipe(new PassThrough({ objectMode: true }));
    if (signal?.aborted) {
      // An 'abort' listener added now would never run.
      this.cancel();
    }
    const stopListening = cancelOnAbort(this, signal);
    call.on("status", stopListening);
  }

  /** The event `message` stands for; null for none (a message of a newer contract). */
  protected abstract eventOf(message: Message): Event | null;

  /**
   * Stop the call; the gateway closes its upstream requests at once. The loop then reads
   * nothing more, not even the messages that had already arrived, and throws `CANCELLED`.
   */
  cancel(): void {
    this.#isCancelled = true;
    this.#call.cancel();
    // The messages that arrived unread go now: kept, the loop yielded them after the
    // cancel, and the stream held them for as long as it was referenced.
    this.#call.unpipe(this.#received);
    dropUnread(this.#call);
    dropUnread(this.#received);
    this.#received.destroy();
  }

  /** Cancel the call as `close()` on its client does: its loop throws CANCELLED saying so. */
  cancelAsClosed(): void {
    if (!this.#isCancelled) {
      this.#cancelDetails = CLIENT_CLOSED;
      this.cancel();
    }
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<Event> {
    const events = this.events();
    return {
      next: () => this.nextOf(events),
      // Leaving the loop early (break, throw in the body, `return()`) cancels the call. Here
      // rather than in the generator's `finally`, which one left before its first `next()`
      // never runs: its call went on, for a later loop to read.
      return: () => {
        this.cancel();
        return events.return();
      },
      // Iterable itself, as the generator it wraps was.
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  /**
   * The next event of `events`, unless another loop is waiting for one: two loops at once
   * split the events between them, each seeing some, or one none, as though the call had
   * answered nothing (`Promise.all` of a text reader and a tool call reader, say). A
   * first event read before the loop (`next()` on an iterator of its own) is no such race.
   */
  private nextOf(events: AsyncGenerator<Event, void>): Promise<IteratorResult<Event, void>> {
    if (this.#isAwaitingEvent) {
      return Promise.reject(
        new TypeError(
          `this ${this.constructor.name} is being read by another loop: each event goes to ` +
            "one loop (read it in one, and share what it yields)",
        ),
      );
    }
    this.#isAwaitingEvent = true;
    return events.next().finally(() => {
      this.#isAwaitingEvent = false;
    });
  }

  private async *events(): AsyncGenerator<Event, void> {
    if (this.#isReadToEnd) {
      // It yielded nothing, as though the call had answered nothing: events are not kept
      // for a replay (a long answer's would stay in memory as long as the stream did).
      throw new TypeError(
        `this ${this.constructor.name} was read to its end already: its events are read ` +
          "once (keep them as they arrive, or make the call again)",
      );
    }
    try {
      for await (const message of this.#received as AsyncIterable<Message>) {
        if (this.#signal?.aborted) {
          // Aborted once the call had ended, its listener gone: what is unread goes too.
          this.cancel();
          break;
        }
        const event = this.eventOf(message);
        if (event !== null) {
          yield event;
        }
      }
    } catch (error) {
      // A cancel ends the loop by destroying the buffer it reads, an error of its own.
      if (!this.#isCancelled) {
        throw asGatewayError(error);
      }
    }
    if (this.#isCancelled) {
      throw cancelledOnClient(this.#cancelDetails);
    }
    if (this.failure !== null) {
      throw asGatewayError(this.failure);
    }
    this.#isReadToEnd = true;
  }
}

/**
 * One event of a streamed completion. A delta's `reasoning` (a reasoning model's thinking,
 * before the text) and `toolCalls` (pieces by index: id and name on a call's first piece,
 * `arguments` to append) are empty when it carries none.
 */
export type StreamEvent =
  | { kind: "delta"; content: string; reasoning: string; toolCalls: ToolCallDelta[] }
  | { kind: "final"; metadata: CompletionMetadata };

/**
 * A streamed completion: iterate its events, or cancel it. Once iterated, `reasoning`
 * holds the reasoning received and `toolCalls` the tool calls assembled from their pieces.
 */
export class CompletionStream extends CallEvents<CompleteStreamResponse, StreamEvent> {
  reasoning = "";
  readonly toolCalls: ToolCall[] = [];

  protected eventOf(message: CompleteStreamResponse): StreamEvent | null {
    const event = message.event;
    if (event?.$case === "delta") {
      this.gather(event.delta);
      const { content, reasoning, toolCalls } = event.delta;
      return { kind: "delta", content, reasoning, toolCalls };
    }
    return event?.$case === "final" ? { kind: "final", metadata: event.final } : null;
  }

  private gather(delta: Delta): void {
    this.reasoning += delta.reasoning;
    for (const piece of delta.toolCalls) {
      const call = this.toolCalls[piece.index];
      if (call === undefined) {
        this.toolCalls[piece.index] = { id: piece.id, name: piece.name, arguments: piece.arguments };
      } else {
        call.arguments += piece.arguments;
      }
    }
  }
}

/** A failed batch item: its `google.rpc.Status`, decoded as a failed call's. */
export interface BatchItemError {
  code: grpc.status;
  /** The status name, e.g. `NOT_FOUND`. */
  codeName: string;
  message: string;
  details: StatusDetails;
}

/**
 * One event of a batch: an item's answer or its failure, each as it finishes (`index` its
 * position in the request), then the summary, last.
 */
export type BatchEvent =
  | { kind: "response"; id: string; index: number; response: CompleteResponse }
  | { kind: "error"; id: string; index: number; error: BatchItemError }
  | { kind: "summary"; summary: BatchSummary };

/** A batch's events: iterate them, or cancel it (the gateway cancels the items in flight). */
export class BatchResults extends CallEvents<CompleteBatchResponse, BatchEvent> {
  protected eventOf(message: CompleteBatchResponse): BatchEvent | null {
    const event = message.event;
    if (event?.$case === "summary") {
      return { kind: "summary", summary: event.summary };
    }
    if (event?.$case !== "result") {
      return null;
    }
    const { id, index, outcome } = event.result;
    if (outcome?.$case === "response") {
      return { kind: "response", id, index, response: outcome.response };
    }
    if (outcome?.$case === "error") {
      return { kind: "error", id, index, error: itemError(outcome.error) };
    }
    return null;
  }
}

/** A batch item's `google.rpc.Status`, decoded. */
function itemError(status: Status): BatchItemError {
  const { code, message } = status;
  return { code, codeName: codeNameOf(code), message, details: statusDetails(status) };
}

/** Read and drop every message `stream` holds: destroy() alone keeps them. */
function dropUnread(stream: Readable): void {
  while (stream.read() !== null) {
    // dropped
  }
}


function credentialsOf(options: GatewayClientOptions): grpc.ChannelCredentials {
  if (options.tls !== undefined && options.credentials !== undefined) {
    throw new Error("give tls or credentials, not both");
  }
  if (options.tls !== undefined) {
    return tlsCredentials(options.tls);
  }
  return options.credentials ?? grpc.credentials.createInsecure();
}

/**
 * `address` with its gRPC scheme (`DNS:`, `IPv4:`, ...) in lower case: a URI's scheme goes
 * in any case (RFC 3986), as the Python client reads it, but grpc-js matches it by case,
 * and connected nowhere for `DNS:///HOST:PORT`, each call waiting out its whole deadline.
 */
function withLowerCaseScheme(address: string): string {
  return address.replace(/^(dns|ipv4|ipv6|unix):/i, (scheme) => scheme.toLowerCase());
}

/** A gRPC target past its scheme (`dns:`, `dns://DNS-SERVER/`, `ipv4:`, `ipv6:`). */
function targetOf(address: string): string {
  return address.replace(/^(dns:(\/\/[^/]*\/)?|ipv4:|ipv6:)/, "");
}

/**
 * The addresses a gRPC target names, past its scheme (in any case): each of an
 * `ipv4:`/`ipv6:` list's, else the one.
 */
function listedAddresses(given: string): string[] {
  const address = withLowerCaseScheme(given);
  const target = targetOf(address);
  return /^ipv[46]:/.test(address) ? target.split(",") : [target];
}

/**
 * `address` without the blanks gRPC leaves out at its end (ASCII spaces, tabs, line
 * breaks: C's isspace, as the Python client's gRPC reads it), which grpc-js took into the
 * port and failed each call UNAVAILABLE, "Failed to parse DNS address".
 */
function withoutTrailingBlanks(address: string): string {
  return address.replace(/[ \t\n\r\v\f]+$/, "");
}

/** `address` as the Python client's gRPC reads it, written for grpc-js. */
function grpcJsTargetOf(address: string): string {
  return withLowerCaseScheme(withoutTrailingBlanks(address));
}

/**
 * Refuse a gRPC target whose port is not 1..65535 written in ASCII digits alone
 * (`HOST:PORT`, `[V6]:PORT`, behind any scheme `targetOf` reads, or in an `ipv4:`/`ipv6:`
 * list), with the Python client's words: a sign (`HOST:+50051`, `HOST:-1`), a leading
 * blank, an empty port (`HOST:`, a script's unset variable), 0, other scripts' digits, or
 * a port past 65535. The Python client's gRPC reads most of them as another port
 * (`-15485` as 50051, `HOST:` as 443); grpc-js connects nowhere, and each call was
 * retried until it failed UNAVAILABLE or its deadline passed. A bare host, a bare IPv6
 * address and `unix:`/`unix-abstract:` targets name no port: nothing to refuse.
 */
export function checkAddress(address: string): void {
  const target = grpcJsTargetOf(address);
  if (/^unix(-abstract)?:/i.test(target)) {
    return; // a socket's path or name, not HOST:PORT
  }
  // `ipv4:`/`ipv6:` name a list of addresses, each with its port: one bad port among
  // them left each call hanging past its deadline.
  for (const each of listedAddresses(target)) {
    const port = portOf(each);
    if (port !== undefined && !isPortNumber(port)) {
      throw new RangeError(
        `${JSON.stringify(address)}: the port must be 1..65535, in digits alone`,
      );
    }
  }
}

/**
 * The port text one `HOST:PORT` or `[V6]:PORT` names, as written (`""` for `HOST:`), or
 * undefined when it names none: a bare host, a bare IPv6 address (`::1`, whose colons are
 * its own), or a target that is no `HOST:PORT` (a path).
 */
function portOf(target: string): string | undefined {
  if (target.includes("/")) {
    return undefined;
  }
  if (target.startsWith("[")) {
    const close = target.indexOf("]");
    return close !== -1 && target[close + 1] === ":" ? target.slice(close + 2) : undefined;
  }
  const colon = target.lastIndexOf(":");
  const host = target.slice(0, colon);
  return colon > 0 && !host.includes(":") ? target.slice(colon + 1) : undefined;
}

/**
 * Whether `port` is a port number written in ASCII digits alone: 1..65535. Not
 * `Number(port)`, which takes a sign, blanks and `0x10`.
 */
function isPortNumber(port: string): boolean {
  return /^[0-9]+$/.test(port) && Number(port) >= 1 && Number(port) <= 65535;
}

/**
 * Whether a gRPC target (`HOST:PORT`, `[V6]:PORT`, `dns:///HOST:PORT`, `dns:HOST:PORT`,
 * `dns://DNS-SERVER/HOST:PORT`) names this machine: `localhost`, 127.0.0.0/8 or ::1 (or its
 * IPv4-mapped form); an `ipv4:`/`ipv6:` list does when each of its addresses does.
 */
export function isLoopbackAddress(address: string): boolean {
  return listedAddresses(address).every(isLoopbackHostPort);
}

/** Whether one `HOST:PORT`, `[V6]:PORT` or bare host names this machine. */
function isLoopbackHostPort(target: string): boolean {
  let host: string;
  if (target.startsWith("[")) {
    host = target.slice(1).split("]")[0];
  } else if (target.split(":").length === 2) {
    host = target.split(":")[0];
  } else {
    host = target;
  }
  host = host.toLowerCase();
  if (host === "localhost" || host === "localhost.") {
    return true;
  }
  if (/^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(host)) {
    return true;
  }
  if (!net.isIPv6(host)) {
    return false;
  }
  // The URL parser writes an IPv6 address one way: "0:0:0:0:0:0:0:1" as "[::1]", and
  // "::ffff:127.0.0.1" as "[::ffff:7f00:1]".
  const canonical = new URL(`http://[${host}]/`).hostname;
  return canonical === "[::1]" || /^\[::ffff:7f[0-9a-f]{2}:[0-9a-f]{1,4}\]$/.test(canonical);
}

/**
 * Refuse an `apiKey` gRPC metadata cannot carry, naming the option (`name`) but never the
 * key. Not a string (a number, an object, a Buffer read without "utf8"): the regular
 * expression and the header took its `String()`, and `Bearer 42` or `Bearer [object Object]`
 * went out, refused as an unknown key, where the Python client raises a TypeError (for
 * bytes too). Null or undefined is none.
 */
export function checkApiKey(apiKey: unknown, name = "apiKey"): void {
  if (apiKey === undefined || apiKey === null) {
    return;
  }
  if (typeof apiKey !== "string") {
    throw new TypeError(`${name}: expected a string, got ${kindOf(apiKey)}`);
  }
  if (!/^[ -~]*$/.test(apiKey)) {
    // grpc-js would refuse it at each call with an error that repeats the key.
    throw new Error(`${name} has characters gRPC metadata cannot carry (a stray newline?)`);
  }
}

/** The gateway's `CompletionService` with the shared retry policy and decoded errors. */
export class GatewayClient {
  readonly stub: CompletionServiceClient;
  // A `#` field, not a TypeScript `private` one: util.inspect, console.log and
  // JSON.stringify show every ordinary property, and would print the caller key.
  readonly #apiKey: string | undefined;
  private readonly defaultTimeoutMs: number | null;
  /**
   * The calls in flight, each by how `close()` cancels it: grpc-js's own close lets them
   * run on, and the process with them, until they end (a stream never read, its deadline).
   */
  readonly #inFlight = new Set<() => void>();

  constructor(given: string, options: GatewayClientOptions = {}) {
    if (typeof given !== "string") {
      throw new TypeError(`address: expected a string, got ${kindOf(given)}`);
    }
    if (typeof options !== "object" || options === null) {
      throw new TypeError(
        `options: expected an object (GatewayClientOptions), got ${kindOf(options)}`,
      );
    }
    checkOptionNames(options, CLIENT_OPTIONS, "GatewayClientOptions", "options");
    checkAddress(given);
    const address = grpcJsTargetOf(given);
    checkApiKey(options.apiKey);
    const serviceConfigJson =
      options.serviceConfigJson ?? fs.readFileSync(defaultServiceConfigPath(), "utf8");
    this.stub = new CompletionServiceClient(
      address,
      credentialsOf(options),
      {
        "grpc.max_receive_message_length": MAX_ANSWER_BYTES,
        "grpc.per_rpc_retry_buffer_size": MAX_RETRIED_REQUEST_BYTES,
        // grpc-js reads `http_proxy`/`https_proxy` itself, and would send the calls to a
        // gateway on this machine through a proxy that cannot reach its loopback.
        ...(isLoopbackAddress(address) ? { "grpc.enable_http_proxy": 0 } : {}),
        ...serviceConfigOptions(serviceConfigJson),
        ...options.channelOptions,
      },
    );
    // `Bearer ` alone was refused as a malformed header where Python sends none, and
    // JavaScript's null went as `Bearer null`, an unknown key.
    this.#apiKey = options.apiKey || undefined;
    this.defaultTimeoutMs = checkedTimeoutMs(
      options.defaultTimeoutMs === undefined ? DEFAULT_TIMEOUT_MS : options.defaultTimeoutMs,
      "defaultTimeoutMs",
    );
  }

  /** Keep `call` in flight until its status arrives, for `close()` to cancel it by `cancel`. */
  private track(call: grpc.Call, cancel: () => void): void {
    this.#inFlight.add(cancel);
    call.on("status", () => this.#inFlight.delete(cancel));
  }

  /** The call's metadata: its own, with the client's key unless it sets one itself. */
  private metadataOf(options: CallOptions): grpc.Metadata {
    const metadata = options.metadata?.clone() ?? new grpc.Metadata();
    if (this.#apiKey !== undefined && metadata.get("authorization").length === 0) {
      metadata.set("authorization", `Bearer ${this.#apiKey}`);
    }
    return metadata;
  }

  /** The call's deadline: its own timeout (null: none), else the client's default. */
  private deadlineOf(options: CallOptions): Partial<grpc.CallOptions> {
    // Not `??`: it took a call's null, "no deadline", for the client's default.
    const timeoutMs =
      options.timeoutMs === undefined
        ? this.defaultTimeoutMs
        : checkedTimeoutMs(options.timeoutMs, "timeoutMs");
    // Infinity is grpc-js's own "no deadline".
    return { deadline: timeoutMs === null ? Infinity : Date.now() + timeoutMs };
  }

  /**
   * A unary call of `send`, its request (a `typeName`) and options checked first: the answer
   * and the attempts it took, or a rejection, `GatewayCallError` or the check's.
   */
  private unary<Response>(
    typeName: string,
    request: unknown,
    given: CallOptions | undefined,
    send: SendUnary<Response>,
  ): Promise<{ response: Response; attempts: number }> {
    return new Promise((resolve, reject) => {
      checkRequest(typeName, request);
      const options = checkedCallOptions(given);
      if (options.signal?.aborted) {
        reject(cancelledOnClient());
        return;
      }
      let attempts = 1;
      let stopListening = (): void => {};
      let isCutByClose = false;
      const call = send(this.metadataOf(options), this.deadlineOf(options), (error, response) => {
        stopListening();
        if (error) {
          reject(isCutByClose ? cancelledOnClient(CLIENT_CLOSED) : asGatewayError(error));
        } else {
          resolve({ response, attempts });
        }
      });
      call.on("metadata", (metadata: grpc.Metadata) => {
        attempts = attemptsOf(metadata);
      });
      this.track(call, () => {
        isCutByClose = true;
        call.cancel();
      });
      stopListening = cancelOnAbort(call, options.signal);
    });
  }

  /**
   * One chat completion; rejects with `GatewayCallError`, or before any call with a
   * `TypeError` or `RangeError` naming the argument or request field it cannot take
   * (`params.maxTokens must be an integer -2147483648..2147483647; got 1.5`).
   */
  complete(request: DeepPartial<CompleteRequest>, given?: CallOptions): Promise<CompleteResult> {
    return this.unary<CompleteResponse>(
      ".llmgateway.v1.CompleteRequest",
      request,
      given,
      (...call) => this.stub.complete(CompleteRequest.fromPartial(request), ...call),
    );
  }

  /**
   * A streamed chat completion: deltas as they arrive, then one final event. Throws before
   * any call, as `complete` rejects, for an argument or request field it cannot take.
   */
  completeStream(
    request: DeepPartial<CompleteStreamRequest>,
    given?: CallOptions,
  ): CompletionStream {
    checkRequest(".llmgateway.v1.CompleteStreamRequest", request);
    const options = checkedCallOptions(given);
    const call = this.stub.completeStream(
      CompleteStreamRequest.fromPartial(request),
      this.metadataOf(options),
      this.deadlineOf(options),
    );
    const stream = new CompletionStream(call, options.signal);
    this.track(call, () => stream.cancelAsClosed());
    return stream;
  }

  /**
   * A batch: each item's answer or failure as it finishes, then the summary. Leaving the
   * loop early (or `cancel()`, or the signal) cancels the call, and the gateway the items
   * still in flight. Throws before any call, as `completeStream`, for an argument or
   * request field it cannot take (`items[2].request.params.maxTokens ...`).
   */
  completeBatch(request: DeepPartial<CompleteBatchRequest>, given?: CallOptions): BatchResults {
    checkRequest(".llmgateway.v1.CompleteBatchRequest", request);
    const options = checkedCallOptions(given);
    const call = this.stub.completeBatch(
      CompleteBatchRequest.fromPartial(request),
      this.metadataOf(options),
      this.deadlineOf(options),
    );
    const results = new BatchResults(call, options.signal);
    this.track(call, () => results.cancelAsClosed());
    return results;
  }

  /**
   * A summary of a document of any length; rejects as `complete` does. It takes the
   * client's default deadline as any call: a long document's can need more than those 5
   * minutes, its own `timeoutMs`.
   */
  async summarize(
    request: DeepPartial<SummarizeRequest>,
    given?: CallOptions,
  ): Promise<SummarizeResponse> {
    const { response } = await this.unary<SummarizeResponse>(
      ".llmgateway.v1.SummarizeRequest",
      request,
      given,
      (...call) => this.stub.summarize(SummarizeRequest.fromPartial(request), ...call),
    );
    return response;
  }

  /**
   * The model catalog (ListModels): each model's context window, pricing and each
   * upstream's health for it; rejects as `complete` does. Python's `list_models`: a Node
   * caller had only the generated stub, and sent it without the client's key or deadline.
   */
  async listModels(given?: CallOptions): Promise<ListModelsResponse> {
    const { response } = await this.unary<ListModelsResponse>(
      ".llmgateway.v1.ListModelsRequest",
      {},
      given,
      (...call) => this.stub.listModels(ListModelsRequest.fromPartial({}), ...call),
    );
    return response;
  }

  /**
   * One page of the usage ledger (GetUsage): at most `pageSize` rows (0: 1,000; past
   * 10,000: 10,000) from `pageToken` on, sorted by tenant, model, upstream and labels,
   * the total of every matching row, and `nextPageToken` ("" on the last page). Rejects
   * as `complete` does (a token from another query: `INVALID_ARGUMENT` on `page_token`).
   */
  async getUsage(
    request: DeepPartial<GetUsageRequest>,
    given?: CallOptions,
  ): Promise<GetUsageResponse> {
    const { response } = await this.unary<GetUsageResponse>(
      ".llmgateway.v1.GetUsageRequest",
      request,
      given,
      (...call) => this.stub.getUsage(GetUsageRequest.fromPartial(request), ...call),
    );
    return response;
  }

  /**
   * Every page of a GetUsage query, each as it arrives: from the request's own
   * `pageToken` (the first page without one), then each page's `nextPageToken` until one
   * is "". Each page is one call, with `given`'s options (its own deadline).
   */
  async *usagePages(
    request: DeepPartial<GetUsageRequest>,
    given?: CallOptions,
  ): AsyncGenerator<GetUsageResponse, void> {
    checkRequest(".llmgateway.v1.GetUsageRequest", request);
    let pageToken = request.pageToken ?? "";
    do {
      const page = await this.getUsage({ ...request, pageToken }, given);
      yield page;
      pageToken = page.nextPageToken;
    } while (pageToken !== "");
  }

  /**
   * Close the channel, cancelling the calls still in flight: each fails CANCELLED ("the
   * client was closed while the call was in flight"), as in the Python client, and the
   * process is not held open by them.
   */
  close(): void {
    for (const cancel of [...this.#inFlight]) {
      cancel();
    }
    this.stub.close();
  }
}
