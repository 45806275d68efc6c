//! Runtime support for `#[cache_loader]` / `#[cache_method]`. Not a public API: the generated
//! code calls these items by absolute path, and they may change in any release.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

pub use ncm_cache_core::CacheStrategy;
use ncm_cache_core::{CacheError, Codec, Operation, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::fetch::Call;
pub use crate::fetch::{Mode, Split};
use crate::key::{args_key as canonical_args, loader_key};
use crate::loader::CacheLoader;

impl<C: Codec> CacheLoader<C> {
    /// Used by the attribute macros to reach the loader through any number of dereferences
    /// (`LazyLock`, `Arc`, `&`) with method-call syntax. Returns a cheap clone.
    #[doc(hidden)]
    pub fn __ncm_cache_loader(&self) -> Self {
        self.clone()
    }
}

/// A hash-ordered set argument (`HashSet`), serialized with its elements sorted as a
/// `BTreeSet` of them would be (numbers by value, strings and tuples as `Ord` orders them;
/// other values by their canonical JSON): its iteration order differs between processes and
/// between two sets of the same elements, and the key must not — and the key of a `BTreeSet`
/// (or a sorted `Vec`) of the same elements, as given to `invalidate`, must be the same.
pub struct Unordered<'a, S: ?Sized>(pub &'a S);

impl<'a, S, T> Serialize for Unordered<'a, S>
where
    S: ?Sized,
    &'a S: IntoIterator<Item = &'a T>,
    T: Serialize + 'a,
{
    fn serialize<Ser: serde::Serializer>(
        &self,
        serializer: Ser,
    ) -> std::result::Result<Ser::Ok, Ser::Error> {
        let mut items = Vec::new();
        for item in self.0 {
            items.push(serde_json::to_value(item).map_err(serde::ser::Error::custom)?);
        }
        items.sort_by(natural_order);
        serializer.collect_seq(items)
    }
}

/// The order a `BTreeSet` of the values' Rust types would have, where JSON keeps it: numbers
/// by value, strings byte-wise, booleans, arrays (tuples) element by element; values of
/// different kinds, and objects, by kind and then canonical JSON (a total order either way).
fn natural_order(a: &serde_json::Value, b: &serde_json::Value) -> std::cmp::Ordering {
    use serde_json::Value;
    use std::cmp::Ordering;
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => {
            let whole = |n: &serde_json::Number| {
                n.as_i64()
                    .map(i128::from)
                    .or_else(|| n.as_u64().map(i128::from))
            };
            match (whole(x), whole(y)) {
                (Some(x), Some(y)) => x.cmp(&y),
                _ => x
                    .as_f64()
                    .partial_cmp(&y.as_f64())
                    .unwrap_or(Ordering::Equal)
                    .then_with(|| x.to_string().cmp(&y.to_string())),
            }
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .map(|(x, y)| natural_order(x, y))
            .find(|o| o.is_ne())
            .unwrap_or_else(|| x.len().cmp(&y.len())),
        _ => rank(a)
            .cmp(&rank(b))
            .then_with(|| crate::key::canonical(a).cmp(&crate::key::canonical(b))),
    }
}

/// A `ttl = <expr>` option must be a `Duration`.
#[inline]
pub fn ttl(ttl: Duration) -> Duration {
    ttl
}

/// The key's argument part from the function's arguments (a tuple of references).
#[inline]
pub fn args_key<A: Serialize + ?Sized>(args: &A) -> Result<String> {
    canonical_args(args)
}

/// The key's argument part from a `key = <expr>` option. Longer than
/// [`MAX_INLINE_ARGS`](crate::key::MAX_INLINE_ARGS) bytes it is hashed as a long argument
/// list is (`#` + 32 hex digits), so a key built from a caller's input (`format!("q:{query}")`)
/// never outgrows the cache's key limit — the read failed with `InvalidKey` and the call
/// returned that error instead of running (review, helper-71). A key that begins with `#` is
/// hashed too, so a literal key can never equal another key's hash; and so is one holding a NUL
/// character, which in-process load flights use as a separator (a caller's `victim\0force`
/// could join the refresh of `victim` and get its value).
#[inline]
pub fn custom_key<K: Display + ?Sized>(key: &K) -> Result<String> {
    let key = key.to_string();
    if key.is_empty() {
        return Err(CacheError::InvalidArgument(
            "the `key` expression produced an empty string".into(),
        ));
    }
    if key.len() > crate::key::MAX_INLINE_ARGS || key.starts_with('#') || key.contains('\0') {
        return Ok(crate::key::hashed(&key));
    }
    Ok(key)
}

/// The path the compiler gives the fn that declares a marker fn (`a::b::f` from
/// `a::b::f::{{closure}}::__ncm_cache_fn`).
fn enclosing_path(marker: &'static str) -> &'static str {
    let mut path = marker.strip_suffix("::__ncm_cache_fn").unwrap_or(marker);
    while let Some(outer) = path.strip_suffix("::{{closure}}") {
        path = outer;
    }
    path
}

/// The loader name of a `#[cache_loader]` function: `{module_path!()}::{fn}` — from the
/// source, the same on every toolchain — unless the function sits in an `impl` block or in
/// another function, where that would be shared with a namesake (`impl User { fn get }` and
/// `impl Order { fn get }`): then the compiler's path of the function (`app::User::get`),
/// which a toolchain may print differently (give `name = ...` where keys must never change).
pub fn fn_name(stable: &'static str, marker: &'static str) -> &'static str {
    let compiler = enclosing_path(marker);
    if compiler == stable { stable } else { compiler }
}

/// The loader name of a `#[cache_method]` method: [`method_path`], and in a trait impl also
/// the trait (`app::Pg as app::UserRepo::get`), so two traits' methods of one name on one type
/// never share keys.
pub fn method_name(
    module: &'static str,
    self_type: &'static str,
    method: &'static str,
    marker: &'static str,
) -> &'static str {
    let compiler = enclosing_path(marker);
    // `<app::Pg as app::UserRepo>::get`: the trait is between " as " and the closing ">::".
    let trait_part = compiler
        .strip_prefix('<')
        .and_then(|rest| rest.rsplit_once(">::"))
        .and_then(|(inside, _)| inside.rsplit_once(" as "))
        .map(|(_, trait_path)| trait_path);
    match trait_part {
        None => method_path(module, self_type, method),
        Some(trait_path) => intern(module, self_type, method, Some(trait_path)),
    }
}

/// The loader name of a method: `{module}::{Type}::{method}`, where `module` is the
/// `module_path!()` of the `impl` and `Type` the last path segment of `Self` — as written,
/// not as the compiler prints paths, so it does not change with the toolchain. A generic
/// `Self` keeps its type arguments (`Repo<app::User>`, as `type_name` prints them): every
/// instantiation gets its own keys, which may change with the compiler; give `name = ...`
/// where keys must never change. Interned: one allocation per (type, method) per process.
pub fn method_path(
    module: &'static str,
    self_type: &'static str,
    method: &'static str,
) -> &'static str {
    intern(module, self_type, method, None)
}

/// `{module}::{Type}::{method}`, or `{module}::{Type} as {Trait}::{method}`, interned.
fn intern(
    module: &'static str,
    self_type: &'static str,
    method: &'static str,
    trait_path: Option<&'static str>,
) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{LazyLock, RwLock};
    type Id = (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    );
    static NAMES: LazyLock<RwLock<HashMap<Id, &'static str>>> = LazyLock::new(Default::default);
    let id = (module, self_type, method, trait_path);
    if let Some(name) = NAMES.read().ok().and_then(|n| n.get(&id).copied()) {
        return name;
    }
    let ty = type_segment(self_type);
    let name = match trait_path {
        None => format!("{module}::{ty}::{method}"),
        Some(t) => format!("{module}::{ty} as {t}::{method}"),
    };
    let name: &'static str = Box::leak(name.into_boxed_str());
    if let Ok(mut names) = NAMES.write() {
        return names.entry(id).or_insert(name);
    }
    name
}

/// `Type` (or `Type<args>`) from a full type name `a::b::Type<args>`.
fn type_segment(full: &str) -> &str {
    let generics = full.find('<').unwrap_or(full.len());
    let start = full[..generics].rfind("::").map_or(0, |i| i + 2);
    &full[start..]
}

/// The call every annotated function makes: cache hit, or the body (once per key across
/// concurrent callers) and a cache write of what `mode` says is cacheable.
///
/// A key that cannot be built (arguments that do not serialize) skips the cache: the body runs
/// and the problem is logged (fail-open).
pub async fn cached<C, M, R, Fut>(
    loader: &CacheLoader<C>,
    name: &'static str,
    key: Result<String>,
    ttl: Option<Duration>,
    strategy: Option<CacheStrategy>,
    _mode: M,
    body: Fut,
) -> R
where
    C: Codec,
    M: Mode<R>,
    Fut: Future<Output = R>,
{
    let counters = loader.counters(name);
    let key = match key {
        Ok(args) => loader_key(name, &args),
        Err(e) => {
            counters.cache_error(Operation::Get);
            if loader.inner.enable_logging {
                tracing::warn!(loader = name, error = %e, "no cache key, calling without the cache");
            }
            return body.await;
        }
    };
    let strategy = match strategy.unwrap_or_default() {
        // Literals are refused at compile time; an expression that evaluates to it is too,
        // here, the first time: a cached function only reads.
        CacheStrategy::WriteThrough => {
            if let Err(e) = crate::loader::check_strategy(name, CacheStrategy::WriteThrough) {
                counters.cache_error(Operation::Set);
                tracing::error!(loader = name, error = %e, "calling without the cache");
            }
            return body.await;
        }
        other => other,
    };
    let call = Call {
        name,
        key: &key,
        ttl,
        strategy,
        force: false,
        fail_closed: false,
    };
    loader.run_cached::<M, R, Fut>(&counters, call, body).await
}

/// Picks the [`Mode`] from the function's output type, whatever name it is written with (a
/// type alias included), by autoref specialization: the macro emits
/// `(&&&&&&Probe::<R>::new()).__ncm_mode()` with the six `Tier*` traits in scope, and the first
/// tier whose impl applies wins:
/// 0. `Result<T, E>` with `E: Clone + From<CacheError>` — [`SharedFromResultMode`] (waiters get a
///    clone of the error; a failing cache reaches a `ReadThrough` call as `E::from`);
/// 1. `Result<T, E>` with `E: Clone` — [`SharedResultMode`] (waiters get a clone of the error);
/// 2. `Result<T, E>` with `E: From<CacheError> + Display` — [`FromErrorResultMode`];
/// 3. any other `Result<T, E>` — [`ResultMode`] (waiters run their own call);
/// 4. `Option<T>` — [`OptionMode`];
/// 5. anything else — [`PlainMode`].
pub struct Probe<R>(std::marker::PhantomData<fn() -> R>);

impl<R> Probe<R> {
    /// The probe for output type `R`.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// Outputs `mode = result` accepts.
#[diagnostic::on_unimplemented(
    message = "`mode = result` needs a function returning `Result<T, E>` (or an alias of one), not `{Self}`"
)]
pub trait IsResult {}

impl<T, E> IsResult for std::result::Result<T, E> {}

/// The probe for `mode = result` (only `Result` outputs).
pub const fn result_probe<R: IsResult>() -> Probe<R> {
    Probe(std::marker::PhantomData)
}

/// Tier 0 of [`Probe`].
pub trait Tier0 {
    /// The picked mode.
    type M;
    /// Picks it.
    fn __ncm_mode(&self) -> Self::M;
}
impl<T, E: Clone + From<CacheError> + Send + Sync + 'static> Tier0
    for &&&&&Probe<std::result::Result<T, E>>
{
    type M = SharedFromResultMode;
    fn __ncm_mode(&self) -> SharedFromResultMode {
        SharedFromResultMode
    }
}

/// Tier 1 of [`Probe`].
pub trait Tier1 {
    /// The picked mode.
    type M;
    /// Picks it.
    fn __ncm_mode(&self) -> Self::M;
}
impl<T, E: Clone + Send + Sync + 'static> Tier1 for &&&&Probe<std::result::Result<T, E>> {
    type M = SharedResultMode;
    fn __ncm_mode(&self) -> SharedResultMode {
        SharedResultMode
    }
}

/// Tier 2 of [`Probe`].
pub trait Tier2 {
    /// The picked mode.
    type M;
    /// Picks it.
    fn __ncm_mode(&self) -> Self::M;
}
impl<T, E: From<CacheError> + std::fmt::Display> Tier2 for &&&Probe<std::result::Result<T, E>> {
    type M = FromErrorResultMode;
    fn __ncm_mode(&self) -> FromErrorResultMode {
        FromErrorResultMode
    }
}

/// Tier 3 of [`Probe`].
pub trait Tier3 {
    /// The picked mode.
    type M;
    /// Picks it.
    fn __ncm_mode(&self) -> Self::M;
}
impl<T, E> Tier3 for &&Probe<std::result::Result<T, E>> {
    type M = ResultMode;
    fn __ncm_mode(&self) -> ResultMode {
        ResultMode
    }
}

/// Tier 4 of [`Probe`].
pub trait Tier4 {
    /// The picked mode.
    type M;
    /// Picks it.
    fn __ncm_mode(&self) -> Self::M;
}
impl<T> Tier4 for &Probe<Option<T>> {
    type M = OptionMode;
    fn __ncm_mode(&self) -> OptionMode {
        OptionMode
    }
}

/// Tier 5 of [`Probe`].
pub trait Tier5 {
    /// The picked mode.
    type M;
    /// Picks it.
    fn __ncm_mode(&self) -> Self::M;
}
impl<R> Tier5 for Probe<R> {
    type M = PlainMode;
    fn __ncm_mode(&self) -> PlainMode {
        PlainMode
    }
}

/// The leader's error, carried to waiters inside [`CacheError::Loader`].
struct SharedFailure<E>(E);

impl<E> std::fmt::Debug for SharedFailure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedFailure")
    }
}

impl<E> std::fmt::Display for SharedFailure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a concurrent call of the same key failed")
    }
}

impl<E> std::error::Error for SharedFailure<E> {}

/// `Result<T, E>` with `E: Clone + From<CacheError>`: like [`SharedResultMode`] (the one load's
/// error cloned to every waiter), and a failing cache reaches a `ReadThrough` call as
/// `E::from(CacheError)`.
#[derive(Debug, Clone, Copy)]
pub struct SharedFromResultMode;

impl<T, E> Mode<std::result::Result<T, E>> for SharedFromResultMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Clone + From<CacheError> + Send + Sync + 'static,
{
    type Stored = T;
    fn split(output: std::result::Result<T, E>) -> Split<T, std::result::Result<T, E>> {
        ResultMode::split(output)
    }
    fn join(stored: T) -> std::result::Result<T, E> {
        Ok(stored)
    }
    fn empty() -> Option<std::result::Result<T, E>> {
        None
    }
    fn flight_error(output: &std::result::Result<T, E>) -> CacheError {
        SharedResultMode::flight_error(output)
    }
    fn shared_error(err: CacheError) -> Option<std::result::Result<T, E>> {
        <SharedResultMode as Mode<std::result::Result<T, E>>>::shared_error(err.clone())
            .or_else(|| Some(Err(E::from(err))))
    }
    fn carries_cache_error() -> bool {
        true
    }
}

/// `Result<T, E>` with `E: Clone`: `Ok` is cached; on `Err` the one load's error is cloned to
/// every caller that waited on it (one call per key, also on failure).
#[derive(Debug, Clone, Copy)]
pub struct SharedResultMode;

impl<T, E> Mode<std::result::Result<T, E>> for SharedResultMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: Clone + Send + Sync + 'static,
{
    type Stored = T;
    fn split(output: std::result::Result<T, E>) -> Split<T, std::result::Result<T, E>> {
        ResultMode::split(output)
    }
    fn join(stored: T) -> std::result::Result<T, E> {
        Ok(stored)
    }
    fn empty() -> Option<std::result::Result<T, E>> {
        None
    }
    fn flight_error(output: &std::result::Result<T, E>) -> CacheError {
        match output {
            Err(e) => CacheError::Loader(std::sync::Arc::new(SharedFailure(e.clone()))),
            Ok(_) => CacheError::loader("the loader failed"),
        }
    }
    fn shared_error(err: CacheError) -> Option<std::result::Result<T, E>> {
        match &err {
            CacheError::Loader(inner) => inner
                .downcast_ref::<SharedFailure<E>>()
                .map(|f| Err(f.0.clone())),
            _ => None,
        }
    }
}

/// `Result<T, E>` with `E: From<CacheError> + Display` (not `Clone`; `anyhow::Error`, boxed
/// errors): waiters of a failed load get `E::from(CacheError::Loader(..))` carrying the
/// leader's error message (not its type: a waiter cannot downcast it) instead of running their
/// own call; a failing cache reaches a `ReadThrough` call as `E::from`.
#[derive(Debug, Clone, Copy)]
pub struct FromErrorResultMode;

impl<T, E> Mode<std::result::Result<T, E>> for FromErrorResultMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
    E: From<CacheError> + std::fmt::Display,
{
    type Stored = T;
    fn split(output: std::result::Result<T, E>) -> Split<T, std::result::Result<T, E>> {
        ResultMode::split(output)
    }
    fn join(stored: T) -> std::result::Result<T, E> {
        Ok(stored)
    }
    fn empty() -> Option<std::result::Result<T, E>> {
        None
    }
    fn flight_error(output: &std::result::Result<T, E>) -> CacheError {
        match output {
            Err(e) => CacheError::loader(e.to_string()),
            Ok(_) => CacheError::loader("a concurrent call of the same key failed"),
        }
    }
    fn shared_error(err: CacheError) -> Option<std::result::Result<T, E>> {
        Some(Err(E::from(err)))
    }
    fn carries_cache_error() -> bool {
        true
    }
}

/// `Result<T, E>` whose `E` is neither `Clone` nor `From<CacheError>`: `Ok` is cached, `Err`
/// is returned and never cached; a caller that waited on a concurrent call which failed runs
/// its own call (its `E` cannot be shared). Make `E: Clone` (or return `Arc<E>`) for one call
/// per key on failure too.
#[derive(Debug, Clone, Copy)]
pub struct ResultMode;

impl<T, E> Mode<std::result::Result<T, E>> for ResultMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = T;
    fn split(output: std::result::Result<T, E>) -> Split<T, std::result::Result<T, E>> {
        match output {
            Ok(v) => Split::Store(v),
            Err(e) => Split::Fail(Err(e)),
        }
    }
    fn join(stored: T) -> std::result::Result<T, E> {
        Ok(stored)
    }
    fn empty() -> Option<std::result::Result<T, E>> {
        None
    }
    fn flight_error(_: &std::result::Result<T, E>) -> CacheError {
        CacheError::loader("a concurrent call of the same key failed")
    }
    fn shared_error(_: CacheError) -> Option<std::result::Result<T, E>> {
        None
    }
}

/// `Option<T>`: `Some` is cached; `None` is returned and not cached.
#[derive(Debug, Clone, Copy)]
pub struct OptionMode;

impl<T> Mode<Option<T>> for OptionMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = T;
    fn split(output: Option<T>) -> Split<T, Option<T>> {
        match output {
            Some(v) => Split::Store(v),
            None => Split::Empty(None),
        }
    }
    fn join(stored: T) -> Option<T> {
        Some(stored)
    }
    fn empty() -> Option<Option<T>> {
        Some(None)
    }
    fn flight_error(_: &Option<T>) -> CacheError {
        CacheError::loader("unreachable: Option outputs never fail")
    }
    fn shared_error(_: CacheError) -> Option<Option<T>> {
        None
    }
}

/// `Option<T>` with `cache_none = true`: `None` is cached too (as a negative entry).
#[derive(Debug, Clone, Copy)]
pub struct OptionCacheNoneMode;

impl<T> Mode<Option<T>> for OptionCacheNoneMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = Option<T>;
    fn split(output: Option<T>) -> Split<Option<T>, Option<T>> {
        Split::Store(output)
    }
    fn join(stored: Option<T>) -> Option<T> {
        stored
    }
    fn empty() -> Option<Option<T>> {
        None
    }
    fn flight_error(_: &Option<T>) -> CacheError {
        CacheError::loader("unreachable: Option outputs never fail")
    }
    fn shared_error(_: CacheError) -> Option<Option<T>> {
        None
    }
}

/// Any other owned, serializable value: always cached.
#[derive(Debug, Clone, Copy)]
pub struct PlainMode;

impl<T> Mode<T> for PlainMode
where
    T: Serialize + DeserializeOwned + Send + 'static,
{
    type Stored = T;
    fn split(output: T) -> Split<T, T> {
        Split::Store(output)
    }
    fn join(stored: T) -> T {
        stored
    }
    fn empty() -> Option<T> {
        None
    }
    fn flight_error(_: &T) -> CacheError {
        CacheError::loader("unreachable: plain outputs never fail")
    }
    fn shared_error(_: CacheError) -> Option<T> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::method_path;

    #[test]
    fn names_come_from_the_source_unless_the_fn_sits_in_an_impl_or_a_trait_impl() {
        use super::{fn_name, method_name};
        assert_eq!(
            fn_name("app::get", "app::get::{{closure}}::__ncm_cache_fn"),
            "app::get"
        );
        assert_eq!(
            fn_name("app::get", "app::User::get::{{closure}}::__ncm_cache_fn"),
            "app::User::get"
        );
        assert_eq!(
            method_name(
                "app",
                "app::Pg",
                "get",
                "<app::Pg as app::UserRepo>::get::{{closure}}::__ncm_cache_fn"
            ),
            "app::Pg as app::UserRepo::get"
        );
        assert_eq!(
            method_name(
                "app",
                "app::Pg",
                "get",
                "app::Pg::get::{{closure}}::__ncm_cache_fn"
            ),
            "app::Pg::get"
        );
    }

    #[test]
    fn method_paths_use_the_impl_module_and_the_types_own_name() {
        assert_eq!(
            method_path("app::svc", "app::svc::UserService", "get"),
            "app::svc::UserService::get"
        );
        assert_eq!(
            method_path("app", "other::place::Repo<app::User>", "find"),
            "app::Repo<app::User>::find"
        );
        assert_eq!(method_path("app", "Plain", "f"), "app::Plain::f");
        // Interned: the same pointer each time.
        assert!(std::ptr::eq(
            method_path("app", "Plain", "f"),
            method_path("app", "Plain", "f")
        ));
    }
}
