// node:fs plus the `globSync` of Node.js 22, which only `conformance tier-check` uses.
import fs from "node:fs";
export * from "node:fs";
export default fs;
export function globSync() {
  throw new Error("globSync needs Node.js 22 or later (only `conformance tier-check` uses it)");
}
