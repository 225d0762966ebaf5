//! The SSE decoder: any bytes, split anywhere, give the same events as in one piece,
//! never panic, and never produce an event or line beyond the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_mcp::SseDecoder;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let mut whole = Vec::new();
    let whole_result = SseDecoder::new(LIMIT).feed(input, &mut whole);
    let mut decoder = SseDecoder::new(LIMIT);
    let mut pieces = Vec::new();
    let mut pieces_result = Ok(());
    for chunk in input.chunks(usize::from(split) + 1) {
        pieces_result = decoder.feed(chunk, &mut pieces);
        if pieces_result.is_err() {
            break;
        }
    }
    assert_eq!(whole_result.is_ok(), pieces_result.is_ok(), "{whole_result:?} {pieces_result:?}");
    if whole_result.is_ok() {
        assert_eq!(whole, pieces);
    }
    for event in &whole {
        assert!(event.data.len() + event.event.len() + event.id.len() <= LIMIT);
    }
});
