/**
 * Example: call the gateway from Node.js.
 *
 *   node clients/node/dist/clients/node/src/example.js [--address HOST:PORT] [--model NAME]
 *     [--max-tokens N] [--api-key KEY] [--timeout SECONDS] [--tls] [--ca-file PEM]
 *     [--cert-file PEM --key-file PEM] [PROMPT]
 *
 * Runs one unary Complete, then the same prompt as a CompleteStream printing deltas as
 * they arrive, then prints usage and cost. A failed call prints its decoded
 * `google.rpc.Status` details (field violations, retry delay, quota violations).
 *
 * `--model` defaults, as in the Python CLI, to gemma-3-270m (the quick start's local model).
 * `--max-tokens N` bounds each answer, as the Python CLI's (1..2147483647); left out, the
 * upstream decides, and the local model rarely stops before its 2048-token window is full.
 * `--address` defaults, as in the Python CLI, to $LLM_GATEWAY_ADDRESS, else 127.0.0.1:50051
 * (an invalid value of the variable is a bad option naming it, as in the Python CLI);
 * `--api-key` (a gateway with `auth.mode: keys`) to $LLM_GATEWAY_API_KEY (a key gRPC
 * metadata cannot carry is a bad option naming the option or the variable). `--timeout` is
 * each call's, in seconds, above 0 and at most 1e6, 300 by default, as the Python CLI's.
 *
 * TLS takes the Python CLI's options and variables: `--tls` ($LLM_GATEWAY_TLS) verifies the
 * gateway against the system's CAs, `--ca-file` ($LLM_GATEWAY_CA_FILE) against this CA,
 * and `--cert-file` with `--key-file` ($LLM_GATEWAY_CERT_FILE, $LLM_GATEWAY_KEY_FILE) add a
 * client certificate (mutual TLS). An option's value follows it or an `=` (`--model=NAME`);
 * a value that begins with `--` only after an `=` (`--api-key=--KEY`): after a space it is
 * taken for the next option, and the one before it lacks its value.
 * A bad option (an unknown one too, or one without its value) exits 2, a failed call 1,
 * one piped into a reader that left (`| head`) 141, one whose output cannot be written
 * (a full disk) 1, saying so, and one stopped by Ctrl-C ends by SIGINT (130 in the shell),
 * its call cancelled, as the Python CLI.
 */
import * as util from "node:util";

import {
  checkAddress,
  checkApiKey,
  DEFAULT_TIMEOUT_MS,
  GatewayCallError,
  GatewayClient,
  MAX_TIMEOUT_MS,
  Role,
  TlsOptions,
} from "./client";

interface Args {
  address: string;
  apiKey: string | undefined;
  model: string;
  maxTokens: number | undefined;
  prompt: string;
  timeoutMs: number;
  tls: TlsOptions | undefined;
}

/**
 * `--model` left out: the Python CLI's default (DEFAULT_MODEL in
 * clients/python/gateway_client/connection.py), the quick start's local model.
 */
const DEFAULT_MODEL = "gemma-3-270m";
const YES = new Set(["1", "true", "yes", "on"]);
const NO = new Set(["", "0", "false", "no", "off"]);
const TAKES_A_VALUE = [
  "--address",
  "--api-key",
  "--model",
  "--max-tokens",
  "--timeout",
  "--ca-file",
  "--cert-file",
  "--key-file",
];
/** A number as Python's float() reads one (not Number's "0x10", "" or "1e"). */
const DECIMAL = /^\s*[+-]?(\d+\.?\d*|\.\d+)(e[+-]?\d+)?\s*$/i;
const MAX_TIMEOUT_S = MAX_TIMEOUT_MS / 1000;
/** An integer as Python's int() reads one (not Number's "0x10", "1e3" or ""). */
const INTEGER = /^\s*[+-]?\d+\s*$/;
/** `params.max_tokens` is an int32, and 0 would ask for no answer: the Python CLI's bounds. */
const MAX_TOKENS_RANGE = [1, 2 ** 31 - 1] as const;

/**
 * `--timeout SECONDS` as milliseconds; left out, the Python CLI's default, 300 s (the
 * client's own). A value that is no number, not above 0 or past 1e6 s is a bad option
 * before any call, as in the Python CLI; before, every call had a fixed 60 s.
 */
function timeoutMsOf(value: string | undefined): number {
  if (value === undefined) {
    return DEFAULT_TIMEOUT_MS;
  }
  if (!DECIMAL.test(value)) {
    throw new Error(`--timeout: '${value}' is not a number of seconds`);
  }
  const seconds = Number(value);
  if (!(seconds > 0 && seconds <= MAX_TIMEOUT_S)) {
    throw new Error(`--timeout: ${value.trim()} is not above 0 and at most 1e+06`);
  }
  return seconds * 1000;
}

/**
 * `--max-tokens N`, each answer's bound; left out, none (the upstream decides). A value
 * that is no integer or outside 1..2147483647 is a bad option before any call, in the
 * Python CLI's words. Without it, the quick start's local model answered each of the two
 * calls until its window was full: 2,000 tokens, about 45 s each on 2 cores.
 */
function maxTokensOf(value: string | undefined): number | undefined {
  if (value === undefined) {
    return undefined;
  }
  if (!INTEGER.test(value)) {
    throw new Error(`--max-tokens: '${value}' is not an integer`);
  }
  const count = Number(value);
  const [low, high] = MAX_TOKENS_RANGE;
  if (!(count >= low && count <= high)) {
    throw new Error(`--max-tokens: ${value.trim()} is outside ${low}..${high}`);
  }
  return count;
}

/**
 * `--address`, else $LLM_GATEWAY_ADDRESS, else 127.0.0.1:50051. The variable's value is
 * checked here, where its refusal can name it, as the Python CLI's does: the client's
 * own said the port was wrong, and left the reader looking for an --address never given.
 */
function addressOf(flags: Map<string, string>, env: NodeJS.ProcessEnv): string {
  const flag = flags.get("--address");
  if (flag !== undefined) {
    return flag; // checked by the client, its refusal quoting what was typed
  }
  const value = env.LLM_GATEWAY_ADDRESS || "127.0.0.1:50051";
  try {
    checkAddress(value);
  } catch (error) {
    throw new Error(`environment variable LLM_GATEWAY_ADDRESS: ${(error as Error).message}`);
  }
  return value;
}

/**
 * `--api-key`, else $LLM_GATEWAY_API_KEY (empty: none), checked here, where its refusal
 * can name the option or the variable, as the Python CLI's does: the client's own named
 * its `apiKey`, an option no reader of the example typed.
 */
function apiKeyOf(flags: Map<string, string>, env: NodeJS.ProcessEnv): string | undefined {
  const flag = flags.get("--api-key");
  const value = flag ?? (env.LLM_GATEWAY_API_KEY || undefined);
  try {
    checkApiKey(value, "the caller key");
  } catch (error) {
    const source = flag !== undefined ? "--api-key" : "environment variable LLM_GATEWAY_API_KEY";
    throw new Error(`${source}: ${(error as Error).message}`);
  }
  return value;
}

/** $LLM_GATEWAY_TLS on or off; neither is an error, as plaintext would be a guess. */
function tlsFromEnv(env: NodeJS.ProcessEnv): boolean {
  const value = env.LLM_GATEWAY_TLS ?? "";
  const word = value.trim().toLowerCase();
  if (!YES.has(word) && !NO.has(word)) {
    throw new Error(
      `environment variable LLM_GATEWAY_TLS: '${value}' is neither on (1, true, yes, on) ` +
        "nor off (0, false, no, off)",
    );
  }
  return YES.has(word);
}

/** TLS options from the flags, else the environment; undefined for plaintext. */
function tlsOf(flags: Map<string, string>, env: NodeJS.ProcessEnv): TlsOptions | undefined {
  const caFile = flags.get("--ca-file") ?? (env.LLM_GATEWAY_CA_FILE || undefined);
  const certFile = flags.get("--cert-file") ?? (env.LLM_GATEWAY_CERT_FILE || undefined);
  const keyFile = flags.get("--key-file") ?? (env.LLM_GATEWAY_KEY_FILE || undefined);
  if ((certFile === undefined) !== (keyFile === undefined)) {
    throw new Error("--cert-file and --key-file go together");
  }
  // A CA or a certificate means TLS whatever $LLM_GATEWAY_TLS says: it is read only when
  // it decides.
  const impliesTls = flags.has("--tls") || caFile !== undefined || certFile !== undefined;
  if (!impliesTls && !tlsFromEnv(env)) {
    return undefined;
  }
  return { caFile, certFile, keyFile };
}

function parseArgs(argv: string[], env: NodeJS.ProcessEnv): Args {
  const flags = new Map<string, string>();
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const joined = /^(--[^=\s]+)=(.*)$/s.exec(flag); // --model=NAME, as the Python CLI takes
    if (joined !== null && TAKES_A_VALUE.includes(joined[1])) {
      flags.set(joined[1], joined[2]);
    } else if (flag === "--tls") {
      flags.set(flag, "");
    } else if (TAKES_A_VALUE.includes(flag)) {
      const value = argv[++i];
      if (value === undefined) {
        throw new Error(`${flag} needs a value`);
      }
      // `--api-key --model gemma` would send "--model" as the key, and gemma as the prompt.
      // The word is not repeated: it may be a key that does begin with --.
      if (value.startsWith("--")) {
        throw new Error(
          `${flag} needs a value, not an option (a value that begins with -- goes as ${flag}=VALUE)`,
        );
      }
      flags.set(flag, value);
    } else if (flag === "--") {
      rest.push(...argv.slice(i + 1));
      break;
    } else if (/^--\S+$/.test(flag)) {
      // A mistyped option (--modle) would otherwise go out, and be paid for, as the prompt.
      throw new Error(`unknown option ${flag} (a prompt that begins with -- goes after --)`);
    } else {
      rest.push(flag);
    }
  }
  return {
    address: addressOf(flags, env),
    apiKey: apiKeyOf(flags, env),
    model: flags.get("--model") ?? DEFAULT_MODEL,
    maxTokens: maxTokensOf(flags.get("--max-tokens")),
    prompt: rest.length > 0 ? rest.join(" ") : "Say hi",
    timeoutMs: timeoutMsOf(flags.get("--timeout")),
    tls: tlsOf(flags, env),
  };
}

function printError(error: unknown): void {
  if (!(error instanceof GatewayCallError)) {
    throw error;
  }
  console.error(`error: ${error.codeName}: ${error.message}`);
  for (const v of error.details.fieldViolations) {
    console.error(`  field ${v.field}: ${v.description}`);
  }
  for (const v of error.details.quotaViolations) {
    console.error(`  quota ${v.subject}: ${v.description}`);
  }
  if (error.details.retryDelayMs !== null) {
    console.error(`  retry after ${error.details.retryDelayMs} ms`);
  }
  const info = error.details.errorInfo;
  if (info !== null) {
    // Its facts (the upstream, its HTTP status, each attempt's failure) as the Python
    // CLI says them: before, the reason alone, and the rest was lost.
    const facts = Object.keys(info.metadata)
      .sort()
      .map((key) => `${key}=${info.metadata[key]}`)
      .join(", ");
    console.error(`  reason ${info.reason}${facts ? `: ${facts}` : ""}`);
  }
  for (const typeUrl of error.details.unknownTypeUrls) {
    console.error(`  undecoded detail ${typeUrl}`);
  }
}

/**
 * The options and the client they ask for, or null after saying why not: a bad option (an
 * unreadable PEM file, a certificate without its key) exits 2, as the Python CLI's usage
 * errors do; 1 is a failed call.
 */
function start(argv: string[]): { args: Args; client: GatewayClient } | null {
  try {
    const args = parseArgs(argv, process.env);
    return { args, client: new GatewayClient(args.address, { apiKey: args.apiKey, tls: args.tls }) };
  } catch (error) {
    console.error(`example: ${(error as Error).message}`);
    process.exitCode = 2;
    return null;
  }
}

/** Whether `error` is standard output's: a write that failed. */
function isOutputError(error: unknown): error is NodeJS.ErrnoException {
  return error instanceof Error && (error as NodeJS.ErrnoException).syscall === "write";
}

/**
 * End the program as a failed write to standard output ends the Python CLI: a reader that
 * left (`| head`) exits 141, as SIGPIPE ends a C program, saying nothing; any other failure
 * (a full disk under `> answer.txt`) exits 1, saying so in one line. Node threw either as
 * an unhandled error, a stack trace: a file's write fails at once, a pipe's as an event.
 */
function endForOutput(error: NodeJS.ErrnoException): never {
  if (error.code === "EPIPE") {
    process.exit(141);
  }
  const reason = util.getSystemErrorMap().get(error.errno ?? 0)?.[1] ?? error.message;
  console.error(`example: cannot write: ${reason}`);
  process.exit(1);
}

/** Set by the first Ctrl-C: the call it cancelled ends the program by SIGINT, saying nothing. */
let isInterrupted = false;

/**
 * Ctrl-C (SIGINT) ends the program as it ends the Python CLI: the call in flight cancelled
 * (the gateway closes its upstream request), then the program ended by SIGINT itself
 * (`endByCtrlC`), nothing said; a second one ends it at once. Before, Node died by the
 * signal before it cancelled its call.
 */
function stopOnCtrlC(client: GatewayClient): void {
  process.on("SIGINT", () => {
    if (isInterrupted) {
      endByCtrlC();
    }
    isInterrupted = true;
    // Each call fails CANCELLED, which main's catch ends the program for, saying nothing.
    client.close();
  });
}

/**
 * End the program by SIGINT, as the Python CLI does (the shell's `$?` is 130): a shell
 * running it in a script stops the script only when the command died of the signal; one
 * that exits 130 is taken to have handled it, and a loop of calls went on, each paid for.
 */
function endByCtrlC(): void {
  process.removeAllListeners("SIGINT"); // Node's default: the signal ends the process
  process.kill(process.pid, "SIGINT");
}

async function main(): Promise<void> {
  process.stdout.on("error", endForOutput);
  const started = start(process.argv.slice(2));
  if (started === null) {
    return;
  }
  const { args, client } = started;
  stopOnCtrlC(client);
  const messages = [{ role: Role.ROLE_USER, content: args.prompt }];
  const params = args.maxTokens === undefined ? undefined : { maxTokens: args.maxTokens };
  try {
    const { response } = await client.complete(
      { model: args.model, messages, params },
      { timeoutMs: args.timeoutMs },
    );
    console.log(`complete: ${response.content}`);

    process.stdout.write("stream:   ");
    for await (const event of client.completeStream(
      { model: args.model, messages, params },
      { timeoutMs: args.timeoutMs },
    )) {
      if (event.kind === "delta") {
        process.stdout.write(event.content);
      } else {
        const usage = event.metadata.usage;
        process.stdout.write("\n");
        console.log(
          `usage:    ${usage?.inputTokens} in, ${usage?.outputTokens} out; ` +
            `cost $${event.metadata.costUsd.toFixed(6)} via ${event.metadata.upstream}`,
        );
      }
    }
  } catch (error) {
    if (isOutputError(error)) {
      endForOutput(error);
    }
    if (isInterrupted) {
      client.close();
      endByCtrlC();
      return;
    }
    printError(error);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

void main();
