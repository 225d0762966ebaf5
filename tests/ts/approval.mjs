// The official TypeScript MCP SDK (its default 60 s request timeout) against a held
// call: the first call comes back with `approval_pending`; after the line "approved"
// on stdin, the retry with the same arguments, one with other arguments, and a second
// retry. Prints each result as JSON.
import { createInterface } from "node:readline";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, argsJson] = process.argv.slice(2);
const args = JSON.parse(argsJson);
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 100000);
const client = new Client({ name: "tollgate-ts-approval", version: "1.0.0" });
await client.connect(new StreamableHTTPClientTransport(new URL(url)));
const call = (a) => client.callTool({ name: "start_fhir_export_job", arguments: a });
const first = await call(args);
console.log(JSON.stringify({ first }));
await createInterface({ input: process.stdin })[Symbol.asyncIterator]().next();
const retry = await call(args);
const otherArgs = await call({ ...args, job_name: "other" });
const secondRetry = await call(args);
await client.close();
clearTimeout(timer);
console.log(JSON.stringify({ retry, otherArgs, secondRetry }));
