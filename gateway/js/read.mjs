// node read.mjs <gateway url> <automerge url> [key]: finds the document and prints it
// (once `key` is present, if given).
import { connect, until, done, fail } from "./lib.mjs";
const [url, docUrl, key] = process.argv.slice(2);
try {
  const repo = connect(url);
  const handle = await repo.find(docUrl);
  if (key) await until(`key ${key}`, () => handle.doc()?.[key] !== undefined);
  done(repo, handle.doc());
} catch (error) { fail(error); }
