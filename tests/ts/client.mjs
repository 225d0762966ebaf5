// The official TypeScript MCP SDK through Tollgate: list tools, call an allowed
// tool, a denied one and one no rule covers, print what came back as JSON.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const url = process.argv[2];
const client = new Client({ name: "tollgate-ts-e2e", version: "1.0.0" });
const timer = setTimeout(() => { console.error("timed out"); process.exit(3); }, 30000);
const transport = new StreamableHTTPClientTransport(new URL(url));
await client.connect(transport);
const tools = (await client.listTools()).tools.map((t) => t.name);
const allowed = await client.callTool({ name: "echo", arguments: { text: "from node" } });
const denied = await client.callTool({ name: "delete_fhir_datastore", arguments: { datastore_id: "x" } });
const defaultDenied = await client.callTool({ name: "drop_tables", arguments: {} });
const sessionId = transport.sessionId ?? null;
await client.close();
clearTimeout(timer);
console.log(JSON.stringify({ tools, allowed, denied, defaultDenied, sessionId }));
