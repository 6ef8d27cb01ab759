// node create.mjs <gateway url> <storage id> <json>: creates a document with the JSON's
// fields, waits until the gateway stores it, prints {"url": ...}.
import { connect, stored, done, fail } from "./lib.mjs";
const [url, storageId, json] = process.argv.slice(2);
try {
  const repo = connect(url);
  const handle = repo.create(JSON.parse(json));
  await stored(handle, storageId);
  done(repo, { url: handle.url });
} catch (error) { fail(error); }
