//! The `setters!` macro: one `#[must_use]` builder method per settings
//! field, so that a settings type gains a field without a breaking change
//! (its fields are `#[non_exhaustive]`, built from `default()` and these).

/// `setters! { /// doc \n field: Type; }` writes `fn field(self, Type) -> Self`.
/// `field: into Type;` takes `impl Into<Type>`; `field: some Type;` takes a
/// `Type` for an `Option<Type>` field, and `field: some into Type;` an
/// `impl Into<Type>` for one.
macro_rules! setters {
    () => {};
    ($(#[$doc:meta])* $field:ident: into $ty:ty; $($rest:tt)*) => {
        $(#[$doc])*
        #[must_use]
        pub fn $field(mut self, value: impl Into<$ty>) -> Self {
            self.$field = value.into();
            self
        }
        $crate::setters::setters! { $($rest)* }
    };
    ($(#[$doc:meta])* $field:ident: some into $ty:ty; $($rest:tt)*) => {
        $(#[$doc])*
        #[must_use]
        pub fn $field(mut self, value: impl Into<$ty>) -> Self {
            self.$field = Some(value.into());
            self
        }
        $crate::setters::setters! { $($rest)* }
    };
    ($(#[$doc:meta])* $field:ident: some $ty:ty; $($rest:tt)*) => {
        $(#[$doc])*
        #[must_use]
        pub fn $field(mut self, value: $ty) -> Self {
            self.$field = Some(value);
            self
        }
        $crate::setters::setters! { $($rest)* }
    };
    ($(#[$doc:meta])* $field:ident: $ty:ty; $($rest:tt)*) => {
        $(#[$doc])*
        #[must_use]
        pub fn $field(mut self, value: $ty) -> Self {
            self.$field = value;
            self
        }
        $crate::setters::setters! { $($rest)* }
    };
}

pub(crate) use setters;
