/**
 * Example: call the gateway from Node.js.
 *
 *   node clients/node/dist/clients/node/src/example.js [--address HOST:PORT] [--model NAME] [PROMPT]
 *
 * Runs one unary Complete, then the same prompt as a CompleteStream printing deltas as
 * they arrive, then prints usage and cost. A failed call prints its decoded
 * `google.rpc.Status` details (field violations, retry delay, quota violations).
 */
import { GatewayCallError, GatewayClient, Role } from "./client";

interface Args {
  address: string;
  model: string;
  prompt: string;
}

function parseArgs(argv: string[]): Args {
  const args: Args = { address: "127.0.0.1:50051", model: "deepseek-v4", prompt: "Say hi" };
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--address") {
      args.address = argv[++i];
    } else if (argv[i] === "--model") {
      args.model = argv[++i];
    } else {
      rest.push(argv[i]);
    }
  }
  if (rest.length > 0) {
    args.prompt = rest.join(" ");
  }
  return args;
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
  if (error.details.errorInfo !== null) {
    console.error(`  reason ${error.details.errorInfo.reason}`);
  }
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const client = new GatewayClient(args.address);
  const messages = [{ role: Role.ROLE_USER, content: args.prompt }];
  try {
    const { response } = await client.complete(
      { model: args.model, messages },
      { timeoutMs: 60_000 },
    );
    console.log(`complete: ${response.content}`);

    process.stdout.write("stream:   ");
    for await (const event of client.completeStream(
      { model: args.model, messages },
      { timeoutMs: 60_000 },
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
    printError(error);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

void main();
