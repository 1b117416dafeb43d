//! A restricted pickle reader that executes nothing: it walks the opcodes of a pickle holding
//! numpy arrays (tuples, lists, numbers, strings and `ndarray`s, as in `mnist.pkl.gz`) and
//! builds plain values. The only globals it accepts are numpy's array reconstruction names;
//! any other name is refused, so a hostile pickle can at most be rejected, never run.

use crate::{Error, Result};
use std::rc::Rc;

/// A value the reader builds.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Bytes(Rc<[u8]>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// An allowed global name (`module.name`).
    Global(String),
    /// `func(*args)` as a pickle describes it, with the state a later BUILD gave it.
    Object {
        func: String,
        args: Vec<Value>,
        state: Option<Box<Value>>,
    },
    Array(Array),
}

/// A numpy array, converted to f32 (floats) or i64 (integers).
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: ArrayData,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

const ALLOWED: [&str; 5] = [
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "copy_reg._reconstructor",
];

#[derive(Clone)]
enum Slot {
    Value(Value),
    Mark,
}

/// Reads the value a pickle holds; `what` names the source in errors.
pub fn read(bytes: &[u8], what: &str) -> Result<Value> {
    let bad = |at: usize, m: String| Error::model(what, format!("pickle byte {at}: {m}"));
    let mut stack: Vec<Slot> = Vec::new();
    let mut memo: std::collections::HashMap<u64, Value> = Default::default();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<&[u8]> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| bad(*pos, "truncated".into()))?;
        let out = &bytes[*pos..end];
        *pos = end;
        Ok(out)
    };
    let le = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64);
    loop {
        let at = pos;
        let op = take(&mut pos, 1)?[0];
        let pop = |stack: &mut Vec<Slot>| match stack.pop() {
            Some(Slot::Value(v)) => Ok(v),
            _ => Err(bad(at, "stack underflow".into())),
        };
        let pop_mark = |stack: &mut Vec<Slot>| {
            let mark = stack
                .iter()
                .rposition(|s| matches!(s, Slot::Mark))
                .ok_or_else(|| bad(at, "no MARK".into()))?;
            let items = stack
                .drain(mark..)
                .skip(1)
                .map(|s| match s {
                    Slot::Value(v) => v,
                    Slot::Mark => unreachable!("rposition found the last mark"),
                })
                .collect::<Vec<_>>();
            Ok::<_, Error>(items)
        };
        let value = match op {
            0x80 => {
                take(&mut pos, 1)?;
                continue;
            }
            0x95 => {
                take(&mut pos, 8)?;
                continue;
            }
            b'.' => return pop(&mut stack),
            b'(' => {
                stack.push(Slot::Mark);
                continue;
            }
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'K' => Value::Int(take(&mut pos, 1)?[0] as i64),
            b'M' => Value::Int(le(take(&mut pos, 2)?) as i64),
            b'J' => Value::Int(le(take(&mut pos, 4)?) as u32 as i32 as i64),
            b'U' | b'C' | 0x8c => {
                let n = take(&mut pos, 1)?[0] as usize;
                Value::Bytes(take(&mut pos, n)?.into())
            }
            b'T' | b'B' | b'X' => {
                let n = le(take(&mut pos, 4)?) as usize;
                Value::Bytes(take(&mut pos, n)?.into())
            }
            b')' => Value::Tuple(Vec::new()),
            b']' => Value::List(Vec::new()),
            b't' => Value::Tuple(pop_mark(&mut stack)?),
            b'l' => Value::List(pop_mark(&mut stack)?),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err(bad(at, "stack underflow".into()));
                }
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(pop(&mut stack)?);
                }
                items.reverse();
                Value::Tuple(items)
            }
            b'a' | b'e' => {
                let items = if op == b'a' {
                    vec![pop(&mut stack)?]
                } else {
                    pop_mark(&mut stack)?
                };
                match stack.last_mut() {
                    Some(Slot::Value(Value::List(list))) => list.extend(items),
                    _ => return Err(bad(at, "APPEND without a list".into())),
                }
                continue;
            }
            b'c' => {
                let line = |pos: &mut usize| -> Result<String> {
                    let rest = &bytes[*pos..];
                    let end = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .ok_or_else(|| bad(*pos, "unterminated GLOBAL".into()))?;
                    *pos += end + 1;
                    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
                };
                let module = line(&mut pos)?;
                let name = line(&mut pos)?;
                global(format!("{module}.{name}"), at, what)?
            }
            0x93 => {
                let name = text(&pop(&mut stack)?, at, what)?;
                let module = text(&pop(&mut stack)?, at, what)?;
                global(format!("{module}.{name}"), at, what)?
            }
            b'R' => {
                let args = match pop(&mut stack)? {
                    Value::Tuple(args) => args,
                    _ => return Err(bad(at, "REDUCE arguments are not a tuple".into())),
                };
                let func = match pop(&mut stack)? {
                    Value::Global(name) => name,
                    _ => return Err(bad(at, "REDUCE of something not callable".into())),
                };
                Value::Object {
                    func,
                    args,
                    state: None,
                }
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let built = match pop(&mut stack)? {
                    Value::Object { func, args, .. } => Value::Object {
                        func,
                        args,
                        state: Some(Box::new(state)),
                    },
                    _ => return Err(bad(at, "BUILD of something not an object".into())),
                };
                array(built, at, what)?
            }
            b'q' | b'r' | 0x94 => {
                let key = match op {
                    b'q' => take(&mut pos, 1)?[0] as u64,
                    b'r' => le(take(&mut pos, 4)?),
                    _ => memo.len() as u64,
                };
                let top = match stack.last() {
                    Some(Slot::Value(v)) => v.clone(),
                    _ => return Err(bad(at, "PUT with nothing on the stack".into())),
                };
                memo.insert(key, top);
                continue;
            }
            b'h' | b'j' => {
                let key = if op == b'h' {
                    take(&mut pos, 1)?[0] as u64
                } else {
                    le(take(&mut pos, 4)?)
                };
                memo.get(&key)
                    .cloned()
                    .ok_or_else(|| bad(at, format!("GET of unknown memo {key}")))?
            }
            other => {
                return Err(bad(
                    at,
                    format!("opcode 0x{other:02x} is not one a numpy-array pickle needs"),
                ))
            }
        };
        stack.push(Slot::Value(value));
    }
}

fn global(name: String, at: usize, what: &str) -> Result<Value> {
    if ALLOWED.contains(&name.as_str()) {
        Ok(Value::Global(name))
    } else {
        Err(Error::model(
            what,
            format!(
                "pickle byte {at}: names `{name}`; only numpy arrays are read, nothing is executed"
            ),
        ))
    }
}

fn text(v: &Value, at: usize, what: &str) -> Result<String> {
    match v {
        Value::Bytes(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        _ => Err(Error::model(
            what,
            format!("pickle byte {at}: expected a string"),
        )),
    }
}

/// A built `_reconstruct(ndarray, …)` object becomes an [`Array`]; anything else stays as it is.
fn array(built: Value, at: usize, what: &str) -> Result<Value> {
    let Value::Object {
        func,
        state: Some(state),
        ..
    } = &built
    else {
        return Ok(built);
    };
    if !func.ends_with("multiarray._reconstruct") {
        return Ok(built);
    }
    let bad = |m: &str| Error::model(what, format!("pickle byte {at}: numpy array {m}"));
    let Value::Tuple(parts) = state.as_ref() else {
        return Err(bad("state is not a tuple"));
    };
    let [_, Value::Tuple(shape), dtype, Value::Bool(fortran), Value::Bytes(raw)] = parts.as_slice()
    else {
        return Err(bad("state is not (version, shape, dtype, fortran, data)"));
    };
    let shape = shape
        .iter()
        .map(|d| match d {
            Value::Int(n) if *n >= 0 => Ok(*n as usize),
            _ => Err(bad("shape holds a non-size")),
        })
        .collect::<Result<Vec<_>>>()?;
    if *fortran && shape.len() > 1 {
        return Err(bad("is in Fortran order"));
    }
    let (kind, order) = match dtype {
        Value::Object {
            func, args, state, ..
        } if func == "numpy.dtype" => {
            let kind = args.first().map(|k| text(k, at, what)).transpose()?;
            let order = match state.as_deref() {
                Some(Value::Tuple(s)) => s.get(1).map(|o| text(o, at, what)).transpose()?,
                _ => None,
            };
            (
                kind.unwrap_or_default(),
                order.unwrap_or_else(|| "|".into()),
            )
        }
        _ => return Err(bad("has no dtype")),
    };
    if order == ">" {
        return Err(bad("is big-endian"));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let width = match kind.as_str() {
        "f4" | "i4" => 4,
        "f8" | "i8" => 8,
        "u1" | "i1" => 1,
        other => {
            return Err(bad(&format!(
                "has dtype `{other}` (f4, f8, i1, i4, i8, u1 are read)"
            )))
        }
    };
    if count.checked_mul(width) != Some(raw.len()) {
        return Err(bad(&format!(
            "holds {} bytes, its shape {shape:?} of `{kind}` needs {}",
            raw.len(),
            count.saturating_mul(width)
        )));
    }
    let chunks = raw.chunks_exact(width);
    let data = match kind.as_str() {
        "f4" => ArrayData::F32(
            chunks
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
        ),
        "f8" => ArrayData::F32(
            chunks
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
        ),
        "i8" => ArrayData::I64(
            chunks
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        "i4" => ArrayData::I64(
            chunks
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
        ),
        "i1" => ArrayData::I64(chunks.map(|c| c[0] as i8 as i64).collect()),
        _ => ArrayData::I64(chunks.map(|c| c[0] as i64).collect()),
    };
    Ok(Value::Array(Array { shape, data }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `((x, y),)` as Python 2's `cPickle.dumps(..., 2)` writes numpy arrays, built by hand.
    fn arrays_pickle() -> Vec<u8> {
        let mut p = vec![0x80, 2];
        let push_array = |p: &mut Vec<u8>, shape: &[u8], kind: &str, raw: &[u8]| {
            p.extend(b"cnumpy.core.multiarray\n_reconstruct\nq\x01");
            p.extend(b"cnumpy\nndarray\nq\x02K\x00\x85U\x01b\x87R(K\x01(");
            for d in shape {
                p.extend([b'K', *d]);
            }
            p.extend(b"tcnumpy\ndtype\nU");
            p.push(kind.len() as u8);
            p.extend(kind.as_bytes());
            p.extend(
                b"K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T",
            );
            p.extend((raw.len() as u32).to_le_bytes());
            p.extend(raw);
            p.extend(b"tb");
        };
        let floats: Vec<u8> = [0.5f32, -1.0, 2.0, 3.25, 0.0, 1.0]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        push_array(&mut p, &[2, 3], "f4", &floats);
        let ints: Vec<u8> = [7i64, 9].iter().flat_map(|i| i.to_le_bytes()).collect();
        push_array(&mut p, &[2], "i8", &ints);
        p.extend(b"\x86\x85.");
        p
    }

    #[test]
    fn reads_numpy_arrays() {
        let Value::Tuple(outer) = read(&arrays_pickle(), "test").unwrap() else {
            panic!("not a tuple")
        };
        let Value::Tuple(pair) = &outer[0] else {
            panic!("not a pair")
        };
        let [Value::Array(x), Value::Array(y)] = pair.as_slice() else {
            panic!("not arrays: {pair:?}")
        };
        assert_eq!(x.shape, vec![2, 3]);
        assert_eq!(x.data, ArrayData::F32(vec![0.5, -1.0, 2.0, 3.25, 0.0, 1.0]));
        assert_eq!(y.data, ArrayData::I64(vec![7, 9]));
    }

    #[test]
    fn refuses_other_globals_and_bad_bytes() {
        let evil = b"\x80\x02cos\nsystem\nU\x02lsR.";
        let message = read(evil, "evil.pkl").unwrap_err().to_string();
        assert!(message.contains("`os.system`"), "{message}");
        let mut short = arrays_pickle();
        short.truncate(short.len() - 40);
        assert!(read(&short, "short").is_err());
        let mut wrong_length = arrays_pickle();
        let at = wrong_length
            .windows(4)
            .position(|w| w == 24u32.to_le_bytes())
            .unwrap();
        wrong_length[at] = 20;
        assert!(read(&wrong_length, "len").is_err());
    }
}
