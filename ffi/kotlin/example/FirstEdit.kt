// A first edit from Kotlin: open a document, set a value and a text, wait until both are
// Durable, print the document; then the async calls: a wait for a sync, and a wait that
// cannot end (the client is paused) cancelled by a timeout.
//
//   FirstEdit <client.toml> <document id>

import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withTimeout
import kotlinx.coroutines.withTimeoutOrNull
import uniffi.meridian_ffi.Client
import uniffi.meridian_ffi.MeridianException
import uniffi.meridian_ffi.PathSegment

fun main(args: Array<String>) {
    val client = Client.fromConfig(args[0])
    try {
        val doc = client.open(args[1])
        doc.waitSynced(30.0)
        doc.putJson(listOf(PathSegment.Key("from")), "\"kotlin\"")
        doc.putText(listOf(PathSegment.Key("text")), "hello")
        doc.spliceText(listOf(PathSegment.Key("text")), 5uL, 0uL, " from Kotlin")
        doc.waitDurable(30.0)
        println(doc.toJson())
        runBlocking { withTimeout(30_000) { doc.waitSyncedAsync() } }
        client.pause()
        doc.putJson(listOf(PathSegment.Key("paused")), "true")
        val ended = runBlocking { withTimeoutOrNull(500) { doc.waitDurableAsync(); "durable" } }
        check(ended == null) { "a paused client's edit cannot become durable" }
        println("cancelled a wait")
        client.resume()
        doc.waitDurable(30.0)
        try {
            doc.putJson(listOf(PathSegment.Key("from"), PathSegment.Key("below")), "1")
            error("a value in the way must be refused")
        } catch (e: MeridianException.InvalidPath) {
            println("refused: ${e.message}")
        }
    } finally {
        client.shutdown()
        client.close()
    }
}
