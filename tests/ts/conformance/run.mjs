// Runs the official MCP conformance CLI (@modelcontextprotocol/conformance) on the
// Node.js this machine has. Its bundle imports `globSync` from "fs", which Node.js
// has only from version 22 on, and uses it only for `tier-check` (not for the
// `server` scenarios the tests run): on an older Node.js, "fs" is resolved, for the
// bundle alone, to a module that adds a `globSync` that says so.
import { register } from "node:module";

if (!("globSync" in (await import("node:fs")))) {
  register("./fs-hooks.mjs", import.meta.url);
}
await import("@modelcontextprotocol/conformance/dist/index.js");
