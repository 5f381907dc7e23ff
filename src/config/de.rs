//! A serde `Deserializer` over figment's value tree that finds every problem of an object at
//! once, each at its key path.
//!
//! serde stops at the first error. [`read`] therefore deserializes an object repeatedly: each
//! failure is recorded at its key path, and on the next pass the value there (or the missing
//! required key) is replaced by a placeholder that any type accepts (an empty string, zero,
//! false, an empty list or table, the first variant of an enum). Keys a struct does not know are
//! recorded with the keys it does know and skipped. The result is the object — with
//! placeholders at the broken paths —, every problem, and the broken paths, so that the checks
//! which run on the object afterwards can drop what they would say about a placeholder.
//!
//! Values from the environment are strings; where a number or a boolean is expected, such a
//! string is parsed (`lossy`), so `EGRESSD_DATAPLANE__GARP_COUNT=7` works while `garp_count =
//! "7"` in the file is still a mistake.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::fmt;

use figment::value::{Dict, Empty, Num, Tag, Value};
use serde::de::value::BorrowedStrDeserializer;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Expected, Unexpected, Visitor};

use super::rules;

/// One problem found while reading, at a key path.
#[derive(Debug, Clone, PartialEq)]
pub enum Problem {
    /// A key the table does not have; `known` are the keys it has.
    UnknownKey {
        known: &'static [&'static str],
    },
    /// A required key is missing.
    Missing,
    /// A value of the wrong kind; `found` describes it ("the integer 5"), `expected` is serde's
    /// wording of the type ("a string", "u64").
    WrongType {
        found: String,
        expected: String,
    },
    /// A number outside what the type holds (`-1` for an unsigned field).
    OutOfRange {
        found: String,
        expected: String,
    },
    /// A value of the right kind that the type refuses.
    Invalid {
        found: String,
        expected: String,
    },
    /// A string that is none of an enum's names.
    UnknownVariant {
        value: String,
        expected: &'static [&'static str],
    },
    /// A string from the environment that should have been an integer or a boolean.
    NotAnInteger(String),
    NotABoolean(String),
    Custom(String),
}

/// What [`read`] found: the value (with placeholders at the broken paths; `None` only if even
/// placeholders could not make one), every problem, and the broken paths.
pub struct Read<T> {
    pub value: Option<T>,
    pub problems: Vec<(String, Problem)>,
    pub broken: BTreeSet<String>,
}

/// Whether `key` equals one of `paths` or lies below it (`a.b` and `a[1]` lie below `a`):
/// a lookup per prefix, so that many broken paths cost no more than a few.
pub fn is_below_any(paths: &BTreeSet<String>, key: &str) -> bool {
    !paths.is_empty()
        && (paths.contains(key)
            || paths.contains("")
            || key
                .char_indices()
                .any(|(i, c)| matches!(c, '.' | '[') && paths.contains(&key[..i])))
}

/// Reads a `T` from `value`, the value at key path `at`; `lossy` tells which values came from
/// the environment.
pub fn read<T: DeserializeOwned>(value: &Value, at: &str, lossy: &dyn Fn(Tag) -> bool) -> Read<T> {
    let cx = Cx {
        lossy,
        broken: RefCell::new(BTreeSet::new()),
        fatal: RefCell::new(Vec::new()),
        soft: RefCell::new(Vec::new()),
        gave_up: Cell::new(false),
    };
    loop {
        cx.soft.borrow_mut().clear();
        let before = cx.broken.borrow().len();
        let path = Path::Root(at);
        let de = De {
            value: (!cx.is_broken(&path)).then_some(value),
            path,
            cx: &cx,
        };
        let result = T::deserialize(de);
        if result.is_ok() || cx.gave_up.get() || cx.broken.borrow().len() == before {
            let mut problems = cx.fatal.take();
            problems.extend(cx.soft.take());
            return Read {
                value: result.ok(),
                problems,
                broken: cx.broken.take(),
            };
        }
    }
}

/// The field names of a struct type, as serde's derive lists them.
pub fn fields_of<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a Cell<&'static [&'static str]>);
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(Error::Recorded)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            self.0.set(fields);
            Err(Error::Recorded)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let fields = Cell::new(&[][..]);
    let _ = T::deserialize(Probe(&fields));
    fields.get()
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
pub enum Error {
    /// Already recorded where it happened; the object is read again.
    Recorded,
    Missing(&'static str),
    Problem(Problem),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Recorded => f.write_str("recorded"),
            Error::Missing(field) => write!(f, "missing field {field}"),
            Error::Problem(p) => write!(f, "{p:?}"),
        }
    }
}

impl std::error::Error for Error {}

fn found(unexp: &Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Bool(b) => format!("the boolean {b}"),
        Unexpected::Unsigned(n) => format!("the integer {n}"),
        Unexpected::Signed(n) => format!("the integer {n}"),
        Unexpected::Float(x) => format!("the number {x}"),
        Unexpected::Char(c) => format!("the character {c:?}"),
        Unexpected::Str(s) => format!("the string {}", rules::quote(s)),
        Unexpected::Unit | Unexpected::Option => "nothing".to_string(),
        Unexpected::Seq => "an array".to_string(),
        Unexpected::Map => "a table".to_string(),
        other => other.to_string(),
    }
}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::Problem(Problem::Custom(rules::shorten_lines(&msg.to_string())))
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Error::Problem(Problem::WrongType {
            found: found(&unexp),
            expected: exp.to_string(),
        })
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        let number = match unexp {
            Unexpected::Signed(n) => Some(n.to_string()),
            Unexpected::Unsigned(n) => Some(n.to_string()),
            Unexpected::Float(x) => Some(x.to_string()),
            _ => None,
        };
        Error::Problem(match number {
            Some(found) => Problem::OutOfRange {
                found,
                expected: exp.to_string(),
            },
            None => Problem::Invalid {
                found: found(&unexp),
                expected: exp.to_string(),
            },
        })
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Self {
        Error::Problem(Problem::Custom(format!(
            "has {len} elements; expected {exp}"
        )))
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Error::Problem(Problem::UnknownVariant {
            value: variant.to_string(),
            expected,
        })
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Error::Problem(Problem::Custom(format!(
            "unknown key {} (known keys here: {})",
            rules::quote(field),
            expected.join(", ")
        )))
    }

    fn missing_field(field: &'static str) -> Self {
        Error::Missing(field)
    }

    fn duplicate_field(field: &'static str) -> Self {
        Error::Problem(Problem::Custom(format!("`{field}` is given twice")))
    }
}

// ---------------------------------------------------------------------------------------------
// Paths and the shared state of one read
// ---------------------------------------------------------------------------------------------

/// A key path, built as the reader descends and rendered only when needed.
#[derive(Clone, Copy)]
enum Path<'a> {
    Root(&'a str),
    Key(&'a Path<'a>, &'a str),
    Index(&'a Path<'a>, usize),
}

impl Path<'_> {
    fn render(&self) -> String {
        match self {
            Path::Root(s) => s.to_string(),
            Path::Key(p, k) => rules::map_key(&p.render(), k),
            Path::Index(p, i) => rules::index(&p.render(), *i),
        }
    }

    fn parent(&self) -> Option<&Path<'_>> {
        match self {
            Path::Root(_) => None,
            Path::Key(p, _) | Path::Index(p, _) => Some(p),
        }
    }
}

struct Cx<'a> {
    lossy: &'a dyn Fn(Tag) -> bool,
    /// Paths read as placeholders.
    broken: RefCell<BTreeSet<String>>,
    /// Problems that broke a path, kept across passes.
    fatal: RefCell<Vec<(String, Problem)>>,
    /// Unknown keys, found again on every pass.
    soft: RefCell<Vec<(String, Problem)>>,
    gave_up: Cell<bool>,
}

impl Cx<'_> {
    fn is_broken(&self, path: &Path<'_>) -> bool {
        let broken = self.broken.borrow();
        !broken.is_empty() && broken.contains(&path.render())
    }

    /// Records `problem` at `key` and reads it as a placeholder from now on. If the path was a
    /// placeholder already (a type no placeholder satisfies), its parent is broken instead.
    fn fail(&self, path: &Path<'_>, key: String, problem: Option<Problem>) {
        if self.broken.borrow_mut().insert(key.clone()) {
            if let Some(p) = problem {
                self.fatal.borrow_mut().push((key, p));
            }
            return;
        }
        match path.parent() {
            Some(parent) => self.fail(parent, parent.render(), None),
            None => self.gave_up.set(true),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The deserializer
// ---------------------------------------------------------------------------------------------

/// The value at `path`, or a placeholder (`value: None`).
#[derive(Clone, Copy)]
struct De<'p, 'v> {
    value: Option<&'v Value>,
    path: Path<'p>,
    cx: &'p Cx<'p>,
}

impl<'p, 'v> De<'p, 'v> {
    /// Records a failure of this value (or the missing field of this struct).
    fn settle<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        match result {
            Ok(v) => Ok(v),
            Err(Error::Recorded) => Err(Error::Recorded),
            Err(Error::Missing(field)) => {
                let key = Path::Key(&self.path, field);
                self.cx.fail(&key, key.render(), Some(Problem::Missing));
                Err(Error::Recorded)
            }
            Err(Error::Problem(p)) => {
                self.cx.fail(&self.path, self.path.render(), Some(p));
                Err(Error::Recorded)
            }
        }
    }

    /// A string from the environment, where a scalar is expected.
    fn lossy_str(&self) -> Option<&'v str> {
        match self.value {
            Some(Value::String(tag, s)) if (self.cx.lossy)(*tag) => Some(s.as_str()),
            _ => None,
        }
    }

    fn integer<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        let Some(s) = self.lossy_str() else {
            return self.any(v);
        };
        let r = match s.trim().parse::<i128>() {
            Ok(n) if n < 0 => match i64::try_from(n) {
                Ok(n) => v.visit_i64(n),
                Err(_) => v.visit_i128(n),
            },
            Ok(n) => match u64::try_from(n) {
                Ok(n) => v.visit_u64(n),
                Err(_) => v.visit_i128(n),
            },
            Err(_) => Err(Error::Problem(Problem::NotAnInteger(s.to_string()))),
        };
        self.settle(r)
    }

    fn any<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        let Some(value) = self.value else {
            return self.settle(v.visit_unit());
        };
        let r = match value {
            Value::String(_, s) => v.visit_borrowed_str(s),
            Value::Char(_, c) => v.visit_char(*c),
            Value::Bool(_, b) => v.visit_bool(*b),
            Value::Num(_, n) => visit_num(*n, v),
            Value::Empty(_, Empty::None) => v.visit_none(),
            Value::Empty(_, Empty::Unit) => v.visit_unit(),
            Value::Dict(_, d) => v.visit_map(Entries::map(d, self)),
            Value::Array(_, a) => v.visit_seq(Elements {
                items: a.iter().enumerate(),
                path: self.path,
                cx: self.cx,
            }),
        };
        self.settle(r)
    }
}

fn visit_num<'de, V: Visitor<'de>>(n: Num, v: V) -> Result<V::Value, Error> {
    match n {
        Num::U8(x) => v.visit_u64(x.into()),
        Num::U16(x) => v.visit_u64(x.into()),
        Num::U32(x) => v.visit_u64(x.into()),
        Num::U64(x) => v.visit_u64(x),
        Num::U128(x) => v.visit_u128(x),
        Num::USize(x) => v.visit_u64(x as u64),
        Num::I8(x) => v.visit_i64(x.into()),
        Num::I16(x) => v.visit_i64(x.into()),
        Num::I32(x) => v.visit_i64(x.into()),
        Num::I64(x) => v.visit_i64(x),
        Num::I128(x) => v.visit_i128(x),
        Num::ISize(x) => v.visit_i64(x as i64),
        Num::F32(x) => v.visit_f64(x.into()),
        Num::F64(x) => v.visit_f64(x),
    }
}

macro_rules! integers {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
            if self.value.is_none() {
                return self.settle(v.visit_u64(0));
            }
            self.integer(v)
        }
    )*};
}

impl<'v> de::Deserializer<'v> for De<'_, 'v> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        self.any(v)
    }

    integers! {
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    }

    fn deserialize_bool<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        if self.value.is_none() {
            return self.settle(v.visit_bool(false));
        }
        let Some(s) = self.lossy_str() else {
            return self.any(v);
        };
        let r = match s.trim() {
            "true" => v.visit_bool(true),
            "false" => v.visit_bool(false),
            _ => Err(Error::Problem(Problem::NotABoolean(s.to_string()))),
        };
        self.settle(r)
    }

    fn deserialize_str<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        if self.value.is_none() {
            return self.settle(v.visit_borrowed_str(""));
        }
        self.any(v)
    }

    fn deserialize_string<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_identifier<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        match self.value {
            None | Some(Value::Empty(_, _)) => self.settle(v.visit_none()),
            Some(_) => self.settle(v.visit_some(self)),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'v>>(
        self,
        _: &'static str,
        v: V,
    ) -> Result<V::Value, Error> {
        self.settle(v.visit_newtype_struct(self))
    }

    fn deserialize_seq<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        if self.value.is_none() {
            return self.settle(v.visit_seq(Elements {
                items: [].iter().enumerate(),
                path: self.path,
                cx: self.cx,
            }));
        }
        self.any(v)
    }

    fn deserialize_map<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        if self.value.is_none() {
            return self.settle(v.visit_map(Entries::placeholders(&[], self)));
        }
        self.any(v)
    }

    fn deserialize_struct<V: Visitor<'v>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            None => self.settle(v.visit_map(Entries::placeholders(fields, self))),
            Some(Value::Dict(_, d)) => {
                for k in d.keys() {
                    if !fields.contains(&k.as_str()) {
                        self.cx.soft.borrow_mut().push((
                            rules::map_key(&self.path.render(), k),
                            Problem::UnknownKey { known: fields },
                        ));
                    }
                }
                self.settle(v.visit_map(Entries::fields(d, fields, self)))
            }
            Some(_) => self.any(v),
        }
    }

    fn deserialize_enum<V: Visitor<'v>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        match self.value {
            None => {
                let first = variants.first().copied().unwrap_or_default();
                self.settle(v.visit_enum(BorrowedStrDeserializer::<Error>::new(first)))
            }
            Some(Value::String(_, s)) => {
                self.settle(v.visit_enum(BorrowedStrDeserializer::<Error>::new(s)))
            }
            Some(_) => self.any(v),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'v>>(self, v: V) -> Result<V::Value, Error> {
        v.visit_unit()
    }

    // Kinds the schema does not use: as they come (a placeholder is a unit).
    serde::forward_to_deserialize_any! {
        <W: Visitor<'v>> f32 f64 char bytes byte_buf unit unit_struct tuple tuple_struct
    }
}

/// The entries of a table: all of them (a map), the known fields of a struct plus placeholders
/// for its broken missing fields, or only placeholders (a placeholder struct).
struct Entries<'p, 'v> {
    items: std::vec::IntoIter<(&'v str, Option<&'v Value>)>,
    current: Option<(&'v str, Option<&'v Value>)>,
    path: Path<'p>,
    cx: &'p Cx<'p>,
}

impl<'p, 'v> Entries<'p, 'v> {
    fn map(d: &'v Dict, de: De<'p, 'v>) -> Self {
        Self::new(d.iter().map(|(k, v)| (k.as_str(), Some(v))).collect(), de)
    }

    fn fields(d: &'v Dict, fields: &'static [&'static str], de: De<'p, 'v>) -> Self {
        let mut items: Vec<(&'v str, Option<&'v Value>)> = d
            .iter()
            .filter(|(k, _)| fields.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), Some(v)))
            .collect();
        if !de.cx.broken.borrow().is_empty() {
            for f in fields {
                if !d.contains_key(*f) && de.cx.is_broken(&Path::Key(&de.path, f)) {
                    items.push((f, None));
                }
            }
        }
        Self::new(items, de)
    }

    fn placeholders(fields: &'static [&'static str], de: De<'p, 'v>) -> Self {
        Self::new(fields.iter().map(|f| (*f, None)).collect(), de)
    }

    fn new(items: Vec<(&'v str, Option<&'v Value>)>, de: De<'p, 'v>) -> Self {
        Entries {
            items: items.into_iter(),
            current: None,
            path: de.path,
            cx: de.cx,
        }
    }
}

impl<'v> de::MapAccess<'v> for Entries<'_, 'v> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'v>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        self.current = Some(item);
        seed.deserialize(BorrowedStrDeserializer::<Error>::new(item.0))
            .map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'v>>(&mut self, seed: S) -> Result<S::Value, Error> {
        let (key, value) = self.current.take().expect("a value follows its key");
        let path = Path::Key(&self.path, key);
        let value = value.filter(|_| !self.cx.is_broken(&path));
        seed.deserialize(De {
            value,
            path,
            cx: self.cx,
        })
    }
}

struct Elements<'p, 'v> {
    items: std::iter::Enumerate<std::slice::Iter<'v, Value>>,
    path: Path<'p>,
    cx: &'p Cx<'p>,
}

impl<'v> de::SeqAccess<'v> for Elements<'_, 'v> {
    type Error = Error;

    fn next_element_seed<S: DeserializeSeed<'v>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, Error> {
        let Some((i, value)) = self.items.next() else {
            return Ok(None);
        };
        let path = Path::Index(&self.path, i);
        let value = (!self.cx.is_broken(&path)).then_some(value);
        seed.deserialize(De {
            value,
            path,
            cx: self.cx,
        })
        .map(Some)
    }
}
